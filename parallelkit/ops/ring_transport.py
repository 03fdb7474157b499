"""Which transport moves the ring ops' chunks: chosen per group and device, made once per group.

Ring attention and the fused ``all_gather_matmul`` / ``matmul_reduce_scatter`` pass chunks around
their group's ring through a ``_C.RingTransport`` (``start(send, recv, tag).wait()``):

- ``c10d``: the group's own send/recv: NCCL on GPUs (also across nodes), gloo on CPU.
- ``shm``: CPU tensors between processes of one machine, through POSIX shared memory.
- ``cuda_ipc``: CUDA tensors between processes of one machine, also several processes on one GPU
  (which NCCL refuses): peer copies on a side stream into the next rank's GPU slots.

``shm`` and ``cuda_ipc`` run one protocol (``csrc/ring/slot_ring.h``): double-buffered receive
slots with sequence numbers in shared memory, a sender that never overwrites a slot its receiver
has not read (back-pressure), and waits that fail with the peer and the step named, after
``PARALLELKIT_RING_TIMEOUT_S`` (120) seconds without progress or at once when a peer exits.

``auto`` (the default) takes ``shm`` for CPU tensors when every member of the group runs on this
machine, and ``cuda_ipc`` for CUDA tensors where NCCL cannot move them: on one machine, when some
ranks share a GPU or the group is not an NCCL one. Otherwise ``c10d``: ranks on distinct GPUs
keep NCCL until ``cuda_ipc`` has run on such a machine (it has run on none yet; set it explicitly
to try it). ``PARALLELKIT_RING_TRANSPORT=auto|c10d|
shm|cuda_ipc``, or ``with ring_transport.use("shm"):`` (for this process, autograd's threads
included), chooses; every rank must choose alike.
``with ring_transport.count_transports() as used:`` counts which transport each op ran on:
``used[("all_gather_matmul", "shm")] == 1``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections import Counter
from typing import Iterator

import torch
import torch.distributed as dist

from parallelkit._native import native
from parallelkit.distributed import comm

KINDS = ("auto", "c10d", "shm", "cuda_ipc")
ENV = "PARALLELKIT_RING_TRANSPORT"
SLOT_BYTES = {"shm": 1 << 20, "cuda_ipc": 16 << 20}  # PARALLELKIT_RING_SLOT_BYTES overrides
TIMEOUT_S = 120.0  # PARALLELKIT_RING_TIMEOUT_S overrides

# Process-wide, not per thread: autograd runs a CUDA backward on its own thread, and it must see
# the forward's choice.
_overrides: list[str] = []
_counters: list[Counter] = []
_same_node: dict = {}   # group -> bool
# (group, kind, device) -> RingTransport. The MPU keeps its groups for the process's life and
# reuses them across layouts, so one transport per group is made once, not once per initialize.
_transports: dict = {}


def requested() -> str:
    """The transport asked for: the innermost :func:`use`, else ``PARALLELKIT_RING_TRANSPORT``,
    else ``auto``."""
    kind = _overrides[-1] if _overrides else os.environ.get(ENV, "auto").strip() or "auto"
    if kind not in KINDS:
        raise ValueError(f"{ENV}={kind!r} must be one of {KINDS}")
    return kind


@contextlib.contextmanager
def use(kind: str) -> Iterator[None]:
    """Run the ring ops inside the block on ``kind`` (one of :data:`KINDS`), in this process."""
    if kind not in KINDS:
        raise ValueError(f"ring transport {kind!r} must be one of {KINDS}")
    _overrides.append(kind)
    try:
        yield
    finally:
        _overrides.pop()


@contextlib.contextmanager
def count_transports() -> Iterator[Counter]:
    """Count ``(op, transport)`` for every ring op run inside the block, on this rank."""
    counter = Counter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def same_node(group: dist.ProcessGroup) -> bool:
    """Whether every member of ``group`` runs on this machine (asked once per group)."""
    if group not in _same_node:
        _same_node[group] = len(set(comm.all_gather_objects(group, _machine()))) == 1
    return _same_node[group]


def _shares_a_device(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Whether two members of ``group`` (all on this machine) use the same GPU (asked once)."""
    key = (group, "device")
    if key not in _same_node:
        index = device.index if device.index is not None else torch.cuda.current_device()
        mine = str(torch.cuda.get_device_properties(index).uuid)
        everyone = comm.all_gather_objects(group, mine)
        _same_node[key] = len(set(everyone)) < len(everyone)
    return _same_node[key]


def choose(group: dist.ProcessGroup, device: torch.device) -> str:
    """The transport the ring ops use for tensors on ``device`` over ``group``."""
    kind = requested()
    if dist.get_world_size(group) == 1:
        return "c10d"  # a ring of one exchanges nothing
    if kind == "auto":
        if not same_node(group):
            return "c10d"
        if device.type != "cuda":
            return "shm"
        nccl = dist.get_backend(group) == "nccl"
        return "cuda_ipc" if not nccl or _shares_a_device(group, device) else "c10d"
    wanted = {"shm": "cpu", "cuda_ipc": "cuda"}.get(kind)
    if wanted is not None and device.type != wanted:
        raise ValueError(f"ring transport {kind!r} moves {wanted} tensors, got tensors on "
                         f"{device}; use 'auto' or "
                         f"{'cuda_ipc' if device.type == 'cuda' else 'shm'} ({ENV})")
    if wanted is not None and not same_node(group):
        raise ValueError(f"ring transport {kind!r} needs every rank of the group on one machine, "
                         f"but they run on several; use 'auto' or 'c10d' ({ENV})")
    return kind


def for_group(group: dist.ProcessGroup, device: torch.device, op: str):
    """The (cached) transport ``op`` runs on over ``group`` for tensors on ``device``; counted.
    Collective the first time for a group: every member must call it."""
    kind = choose(group, device)
    key = (group, kind, str(device))
    transport = _transports.get(key)
    if transport is None:
        if kind == "c10d":
            transport = native.C10dRingTransport(group)
        else:
            try:
                transport = create(group, kind, device=device)
            except RingTransportUnavailable as exc:
                if requested() != "auto":
                    raise
                warnings.warn(f"{exc}; the ring ops fall back to c10d on this group")
                kind, transport = "c10d", native.C10dRingTransport(group)
        _transports[key] = transport
    # The native overlap ops (torch.ops.parallelkit.*) take the group by name and look the
    # transport up: the one chosen last for this group and device type.
    native.register_ring_transport(comm.group_name(group), device.type, transport)
    kind = transport.name
    for counter in _counters:
        counter[(op, kind)] += 1
    return transport


class RingTransportUnavailable(RuntimeError):
    """A shm or cuda_ipc ring could not be set up on some rank (every rank raises it alike)."""


def create(group: dist.ProcessGroup, kind: str, *, device: torch.device | None = None,
           slots: int = 2, slot_bytes: int | None = None, timeout_s: float | None = None,
           backpressure: bool = True):
    """A new, uncached ``shm`` or ``cuda_ipc`` transport over ``group``'s ring. Collective.

    Each rank makes its receive slots, the ranks exchange their addresses (shared-memory names,
    CUDA IPC handles) through ``group``, and each opens its next rank's. ``backpressure=False``
    exists only to show, in a test, the corruption the protocol prevents.
    """
    if kind not in ("shm", "cuda_ipc"):
        raise ValueError(f"create() makes 'shm' or 'cuda_ipc' rings, not {kind!r}")
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    slot_bytes = slot_bytes or int(os.environ.get("PARALLELKIT_RING_SLOT_BYTES", SLOT_BYTES[kind]))
    timeout_s = timeout_s or float(os.environ.get("PARALLELKIT_RING_TIMEOUT_S", TIMEOUT_S))
    index = -1
    if kind == "cuda_ipc":
        device = torch.device(device if device is not None else "cuda")
        index = device.index if device.index is not None else torch.cuda.current_device()
    ring, address, error = None, b"", None
    try:
        ring = native.SlotRingTransport(kind, rank, p, slots, slot_bytes, timeout_s, index,
                                        backpressure)
        address = ring.address()
    except Exception as exc:  # every rank must hear of it, or the others wait in the gather
        error = f"{type(exc).__name__}: {exc}"
    everyone = comm.all_gather_objects(group, (address, os.getpid(), error))
    if not _first_error(everyone, 2):
        labels = comm.rank_labels(group)
        nxt, prev = (rank + 1) % p, (rank - 1) % p
        try:
            ring.connect(everyone[nxt][0], everyone[prev][1], labels[prev], everyone[nxt][1],
                         labels[nxt])
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        # Also the barrier before unlink(): after it, every rank has opened its next's segment.
        everyone = comm.all_gather_objects(group, (None, None, error))
    if ring is not None:
        ring.unlink()  # the name goes; the mappings stay, and a crash leaves nothing behind
    failed = _first_error(everyone, 2)
    if failed:
        i, text = failed
        raise RingTransportUnavailable(f"the {kind} ring transport could not be set up: "
                                       f"{comm.rank_labels(group)[i]}: {text}")
    return ring


def _first_error(everyone: list, field: int):
    return next(((i, v[field]) for i, v in enumerate(everyone) if v[field] is not None), None)


def _machine() -> str:
    """This machine: its host name, and its boot id (two hosts may share a name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
