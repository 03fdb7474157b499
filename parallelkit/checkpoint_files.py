"""The checkpoint folder on disk: replacing it with no instant of loss, finding the copy that
survives a crash, and checking the data files before DCP reads them.

A save writes every rank's data into ``<path>.incomplete-<T>`` (T: the save's token), then rank 0
replaces ``path`` in the named ``SAVE_STEPS``. A crash right after each step leaves:

    after step      on disk                                          load_checkpoint(path) reads
    written         path (old) · path.incomplete-T (new, complete)   path: the old
    checksummed     ... and the new folder's .checksums              path: the old
    old_set_aside   path.old-T (old) · path.incomplete-T (new)       the new one, with a warning
    new_in_place    path.old-T (old) · path (new)  (the commit)      path: the new
    cleaned         path (new)                                       path: the new

Why no crash loses both: each step is one rename (atomic within a file system) or a write into a
folder that is not ``path``, so a crash leaves one of these rows, and every row holds a complete
copy. A folder is complete once it has DCP's ``.metadata``, which DCP writes after every rank's
data. When ``path`` is not complete, a load takes the newest complete ``path.old-*`` or
``path.incomplete-*`` and warns with its name; the next save removes the leftovers once its own
copy is in place (never before: a leftover may be the only complete copy). A folder is removed
``.metadata`` first, so a removal cut short never leaves a folder that looks complete. The
parent folder is fsynced after each rename, so the renames also survive a power cut.

Integrity: DCP stores tensors as raw bytes and checks nothing, so bytes overwritten in place would
load silently. The save records each data file's size and CRC-32 in ``.checksums``; each rank
checksums a share of the files just written (from the page cache, mostly), so a save costs one
more read of the checkpoint spread over the ranks, at ~3 GB/s a core. A load checks every size
(a ``stat`` per file: truncated or missing files) and, unless ``verify=False``, the checksums:
again one more read of the checkpoint, spread over the ranks. Checkpoints without
``.checksums`` (older ones) get the size checks only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zlib

METADATA = ".metadata"  # DCP writes it last: without it a checkpoint is incomplete
CHECKSUMS = ".checksums"  # {"files": {name: [size, crc32]}}, written by rank 0 before the commit
SAVE_STEPS = ("written", "checksummed", "old_set_aside", "new_in_place", "cleaned")


class CheckpointDamagedError(RuntimeError):
    """A checkpoint that is complete (it has ``.metadata``) but has a damaged file."""


def _after_step(step: str) -> None:
    """Called as each of ``SAVE_STEPS`` completes; the fault tests replace it to kill the
    process there."""


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, METADATA))


def staging_path(path: str, token: str) -> str:
    return f"{path}.incomplete-{token}"


def replace_checkpoint(path: str, staging: str, token: str,
                       checksums: dict[str, list[int]]) -> None:
    """Rank 0's part of a save, once every rank's data is in ``staging``: ``SAVE_STEPS``."""
    _after_step("written")
    _write_checksums(staging, checksums)
    _after_step("checksummed")
    parent = os.path.dirname(path) or "."
    if os.path.lexists(path):
        os.replace(path, f"{path}.old-{token}")
        _fsync_folder(parent)
    _after_step("old_set_aside")
    os.replace(staging, path)
    _fsync_folder(parent)
    _after_step("new_in_place")
    for leftover in _leftovers(path):
        _remove(leftover)
    _after_step("cleaned")


def find_complete(path: str) -> str:
    """``path`` when complete, else the newest complete copy an interrupted save left next to
    it (with a warning naming it)."""
    if is_complete(path):
        return path
    leftovers = _leftovers(path)
    copies = [folder for folder in leftovers if is_complete(folder)]
    if not copies:
        found = f"; the unfinished save folders next to it hold none either: {leftovers}" \
            if leftovers else ""
        raise FileNotFoundError(f"no complete checkpoint at {path!r} (no {METADATA} file): it "
                                f"does not exist or its save did not finish{found}")
    # The newest copy is the one the interrupted save wrote; on a tie, the new over the old.
    newest = max(copies, key=lambda f: (os.stat(os.path.join(f, METADATA)).st_mtime_ns,
                                        ".incomplete-" in f))
    warnings.warn(f"no complete checkpoint at {path!r}: a save was interrupted; loading "
                  f"{newest!r}, the newest complete copy it left. Rename that folder to {path!r} "
                  "to keep it; the next save there removes the leftovers", stacklevel=3)
    return newest


def _leftovers(path: str) -> list[str]:
    parent, name = os.path.split(path)
    if not os.path.isdir(parent or "."):
        return []
    pattern = re.compile(re.escape(name) + r"\.(incomplete|old)-[0-9a-f]{8}")
    return [os.path.join(parent, f) for f in sorted(os.listdir(parent or "."))
            if pattern.fullmatch(f)]


def _remove(folder: str) -> None:
    try:  # first, so that a removal cut short leaves a folder no load takes for complete
        os.remove(os.path.join(folder, METADATA))
    except FileNotFoundError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checksums(folder: str, checksums: dict[str, list[int]]) -> None:
    temporary = os.path.join(folder, CHECKSUMS + ".tmp")
    with open(temporary, "w") as f:
        json.dump({"files": checksums}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, CHECKSUMS))
    _fsync_folder(folder)


def data_files(metadata) -> dict[str, int]:
    """Each data file DCP's ``metadata`` refers to, with the byte its last item ends at."""
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return ends


def checksum_share(folder: str, names, rank: int, world: int) -> dict[str, list[int]]:
    """``{name: [size, crc32]}`` of this rank's share of the data files ``names``."""
    return {name: [os.path.getsize(os.path.join(folder, name)), _crc32(os.path.join(folder, name))]
            for name in sorted(names)[rank::world]}


def _crc32(file: str) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def damaged_files(folder: str, metadata, verify: bool, rank: int, world: int) -> list[str]:
    """What is wrong with the data files, one line each: every file's size is checked (a stat),
    and with ``verify`` this rank's share of the checksums."""
    saved = _read_checksums(folder)
    problems = []
    for name, end in sorted(data_files(metadata).items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            problems.append(f"data file {file!r} is missing")
            continue
        size = os.path.getsize(file)
        if name in saved and size != saved[name][0]:
            problems.append(f"data file {file!r} is {size} bytes, {saved[name][0]} when saved "
                            f"({'truncated' if size < saved[name][0] else 'appended to'})")
        elif size < end:
            problems.append(f"data file {file!r} is truncated: {size} bytes, but its data "
                            f"runs to byte {end}")
    if problems or not verify:
        return problems
    share = checksum_share(folder, [n for n in data_files(metadata) if n in saved], rank, world)
    return [f"data file {os.path.join(folder, name)!r} is corrupted: its CRC-32 is {crc:08x}, "
            f"{saved[name][1]:08x} when saved (same size: bytes were overwritten)"
            for name, (_, crc) in share.items() if crc != saved[name][1]]


def _read_checksums(folder: str) -> dict[str, list[int]]:
    try:
        with open(os.path.join(folder, CHECKSUMS)) as f:
            return json.load(f)["files"]
    except FileNotFoundError:
        return {}  # saved before checksums existed, or cut short before they were written
    except (ValueError, KeyError) as error:
        raise CheckpointDamagedError(f"checkpoint {folder!r}: its {CHECKSUMS} file cannot be "
                                     f"read ({error}); delete it to load without checksums"
                                     ) from error
