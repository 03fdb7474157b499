"""Checkpoint faults in one process: a save killed at each step of its sequence leaves the old or
the new checkpoint loadable, bitwise; damaged files are named at load."""

import multiprocessing
import os
import re
import warnings

import pytest
import torch

from parallelkit import checkpoint_files
from parallelkit.checkpoint import CheckpointDamagedError, load_checkpoint, save_checkpoint
from parallelkit.models.tinylm import TinyConfig, TinyLM

CONFIG = TinyConfig(vocab=64, layers=1)
KILLED = 17  # the exit status of a save killed on purpose
# What a load finds after a save killed right after each step: the commit is new_in_place, and
# after old_set_aside the load recovers the new copy from its staging folder.
FINDS = {"writing": "old", "written": "old", "checksummed": "old", "old_set_aside": "new",
         "new_in_place": "new", "cleaned": "new"}


def tiny_model(seed):
    torch.manual_seed(seed)
    return TinyLM(CONFIG)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def load(path, **kwargs):
    """The loaded parameters and the 'save was interrupted' warnings."""
    model = tiny_model(99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(path, model, **kwargs)
    return parameters(model), [str(w.message) for w in caught if "interrupted" in str(w.message)]


def _save_and_die(path, model, step):
    """In a forked child: save ``model`` at ``path`` and die, without cleanup, after ``step``."""
    def die(*args, **kwargs):
        os._exit(KILLED)

    if step == "writing":  # inside DCP's write: the data files are there, its .metadata is not
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        FileSystemWriter.finish = die
    checkpoint_files._after_step = lambda reached: die() if reached == step else None
    save_checkpoint(path, model)
    os._exit(0)


@pytest.mark.parametrize("step", FINDS)
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, step):
    assert set(FINDS) == {"writing", *checkpoint_files.SAVE_STEPS}
    path = str(tmp_path / "ckpt")
    old, new = tiny_model(0), tiny_model(1)
    save_checkpoint(path, old)
    child = multiprocessing.get_context("fork").Process(target=_save_and_die,
                                                        args=(path, new, step))
    child.start()
    child.join(120)
    assert child.exitcode == KILLED, f"the save was not killed after {step!r}"

    loaded, recovered = load(path)
    expected = {"old": parameters(old), "new": parameters(new)}[FINDS[step]]
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected), FINDS[step]
    if step == "old_set_aside":  # the warning names the folder it loaded
        assert len(recovered) == 1 and f"{path}.incomplete-" in recovered[0]
    else:
        assert not recovered

    latest = tiny_model(2)  # the next save succeeds and removes what the killed one left
    save_checkpoint(path, latest)
    assert os.listdir(tmp_path) == ["ckpt"]
    loaded, _ = load(path)
    assert all(torch.equal(loaded[name], p) for name, p in parameters(latest).items())


def test_no_complete_copy_anywhere(tmp_path):
    os.makedirs(tmp_path / "ckpt.incomplete-0123abcd")  # a save killed before DCP's .metadata
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint at .*ckpt'.*"
                                                r"hold none either.*ckpt\.incomplete-0123abcd"):
        load_checkpoint(str(tmp_path / "ckpt"), tiny_model(0))


def saved_checkpoint(tmp_path):
    """A saved checkpoint folder and its one data file."""
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, tiny_model(0))
    (data,) = [f for f in os.listdir(path) if f.endswith(".distcp")]
    return path, os.path.join(path, data)


def test_a_missing_data_file_is_named(tmp_path):
    path, data = saved_checkpoint(tmp_path)
    os.remove(data)
    with pytest.raises(CheckpointDamagedError, match=re.escape(f"data file '{data}' is missing")
                                                     + ".*Restore the file from a copy"):
        load(path)


def test_a_truncated_data_file_is_named_with_and_without_checksums(tmp_path):
    path, data = saved_checkpoint(tmp_path)
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointDamagedError,
                       match=re.escape(f"data file '{data}' is {size - 100} bytes, {size} "
                                       "when saved (truncated)")):
        load(path)
    os.remove(os.path.join(path, checkpoint_files.CHECKSUMS))  # as saved by an older version
    with pytest.raises(CheckpointDamagedError,
                       match=re.escape(f"data file '{data}' is truncated: {size - 100} "
                                       "bytes, but its data runs to byte")):
        load(path)


def test_a_corrupted_data_file_is_named(tmp_path):
    path, data = saved_checkpoint(tmp_path)
    size = os.path.getsize(data)
    with open(data, "r+b") as f:  # same size, bytes in the middle of a tensor overwritten
        f.seek(size // 2)
        f.write(b"\xff" * 64)
    with pytest.raises(CheckpointDamagedError,
                       match=re.escape(f"data file '{data}' is corrupted: its CRC-32 is ")
                       + r"[0-9a-f]{8}, [0-9a-f]{8} when saved \(same size: bytes were overwritten"):
        load(path)


def test_a_corrupted_metadata_file_is_named(tmp_path):
    path, _ = saved_checkpoint(tmp_path)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(CheckpointDamagedError, match=r"its \.metadata file cannot be read"):
        load(path)
