"""Checkpoints that load at another layout, with ``torch.distributed.checkpoint`` (DCP).

Every tensor-parallel shard (a parameter with ``tp_shard_dim``) is described to DCP as a DTensor
``Shard(dim)`` over the TP group, and everything else as replicated, so DCP records the full
shapes and where each piece lives. Loading builds the same description for the *current* layout
and DCP reads exactly the slices each rank needs: save at tp=2, load at tp=4, at tp=1, or into
the dense model in a single process. Data-parallel replicas write once (DCP deduplicates them).

Optimizer state is saved next to the parameters for optimizers whose state is per-parameter
tensors shaped like the parameter plus a scalar ``step`` (Adam, AdamW, SGD with momentum).

``extra`` saves more state in the same folder and the same commit (a trainer's step, scheduler
and random streams): nested dicts become dotted keys under ``extra.``, tensors are stored as
tensors and loaded in place, anything else is pickled. DCP keeps one copy of each key, from any
rank, so a value that differs between ranks needs the rank in its key.

Under pipeline parallelism each rank saves and loads only the parameters its optimizer holds
(its stages), under their names in the whole model, so the union over ranks is the model and a
checkpoint saved at pp=2 loads at pp=1, or the other way round.

A save goes to a temporary folder that replaces ``path`` only after every rank has written, in
steps chosen so that a crash at any instant leaves the old or the new checkpoint loadable, and
records a checksum of each data file (``checkpoint_files`` explains both). A load first checks
that the checkpoint fits the model (same keys, same full shapes) and that its files are whole,
so each failure names the key or the file and the fix rather than failing inside DCP.
"""

from __future__ import annotations

import os
import pickle
import uuid

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from parallelkit import checkpoint_files as files
from parallelkit.checkpoint_files import CheckpointDamagedError
from parallelkit.distributed import comm

__all__ = ["save_checkpoint", "load_checkpoint", "full_state_dict", "sharded_state_dict",
           "CheckpointMismatchError", "CheckpointDamagedError"]


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: a key it lacks, or a tensor of another shape."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _tp_group():
    from parallelkit.distributed import mpu

    return mpu.get_tp_group() if mpu.is_initialized() else None


def _describe(tensor: torch.Tensor, shard_dim: int | None, mesh):
    """``tensor`` (this rank's piece) as DCP should see it: a DTensor when sharded over TP."""
    if mesh is None or shard_dim is None or mesh.size() == 1:
        return tensor
    from torch.distributed.tensor import DTensor, Shard

    full = list(tensor.shape)
    full[shard_dim] *= mesh.size()
    return DTensor.from_local(tensor, mesh, [Shard(shard_dim)], run_check=False,
                              shape=torch.Size(full), stride=_contiguous_stride(full))


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, strides = 1, []
    for size in reversed(shape):
        strides.append(stride)
        stride *= size
    return tuple(reversed(strides))


def _tp_mesh():
    group = _tp_group()
    if group is None or dist.get_world_size(group) == 1:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, "cuda" if dist.get_backend() == "nccl" else "cpu")


def _owned(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list:
    """(name, parameter) of what this rank trains: the optimizer's parameters (a pipeline
    stage), or the whole model when there is no optimizer."""
    if optimizer is None:
        return list(model.named_parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [(name, p) for name, p in model.named_parameters() if id(p) in held]


def sharded_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Model (and optimizer) state as DCP sees it; its tensors share storage with the live ones,
    so ``dcp.load`` into it loads the model in place."""
    mesh = _tp_mesh()
    state = {f"model.{name}": _describe(p.detach(), getattr(p, "tp_shard_dim", None), mesh)
             for name, p in _owned(model, optimizer)}
    if optimizer is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                per_param = optimizer.state[p]
                if not per_param:  # before the first step: make the state a load can fill
                    per_param.update(_empty_state(optimizer, p))
                for key, value in per_param.items():
                    sharded = torch.is_tensor(value) and value.shape == p.shape and value.dim()
                    dim = getattr(p, "tp_shard_dim", None) if sharded else None
                    state[f"optim.{names[id(p)]}.{key}"] = _describe(value, dim, mesh)
    return state


def _empty_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p)}
    if isinstance(optimizer, torch.optim.SGD):
        return {"momentum_buffer": torch.zeros_like(p)}
    raise TypeError(f"checkpointing {type(optimizer).__name__} state is not supported; use "
                    "Adam, AdamW or SGD")


def save_checkpoint(path: str, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None) -> None:
    """Write a checkpoint folder at ``path`` (a collective when distributed), replacing the one
    there, if any, only once the new one is complete. ``extra``: more state (module docstring)."""
    path = os.path.normpath(path)
    token = _shared_token()
    staging = files.staging_path(path, token)
    state = {**sharded_state_dict(model, optimizer), **_flat_extra(extra, pickled=True)}
    # DCP returns once every rank's data and its .metadata are written, on every rank.
    metadata = dcp.save(state, checkpoint_id=staging)
    rank, world = _rank_and_world()
    share = files.checksum_share(staging, files.data_files(metadata), rank, world)
    checksums = {name: value for part in _all_gather(share) for name, value in part.items()}
    if rank == 0:
        files.replace_checkpoint(path, staging, token, checksums)
    if _distributed():
        dist.barrier()  # no rank returns before the checkpoint is in place


def _shared_token() -> str:
    token = [uuid.uuid4().hex[:8]]
    if _distributed():
        dist.broadcast_object_list(token, src=0)  # one staging folder for all ranks
    return token[0]


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _all_gather(value) -> list:
    """``value`` from every rank (just this one when not distributed)."""
    if not _distributed():
        return [value]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    verify: bool = True, extra: dict | None = None) -> dict | None:
    """Load ``path`` into ``model`` (and ``optimizer``) at the current layout, in place.

    ``extra``, if given, says which saved extra state to read: its keys and structure as saved,
    its tensors the shapes saved (they are loaded in place). Returns the same structure holding
    the values read (None without ``extra``).

    When a save at ``path`` was interrupted, loads the complete copy it left and warns (see
    ``checkpoint_files``). Raises ``CheckpointMismatchError`` when the checkpoint does not fit
    the model and ``CheckpointDamagedError`` when a file is missing, truncated or (``verify``:
    compare checksums, one more read of the data) corrupted; on every rank alike."""
    folder = files.find_complete(os.path.normpath(path))
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata()
    except Exception as error:
        raise CheckpointDamagedError(f"checkpoint {folder!r}: its {files.METADATA} file cannot "
                                     f"be read ({type(error).__name__}: {error}); load an "
                                     "earlier checkpoint") from error
    flat_extra = _flat_extra(extra, pickled=False)
    state = {**sharded_state_dict(model, optimizer), **flat_extra}
    _check_fits(folder, metadata.state_dict_metadata, state)
    problems = sorted({p for part in _all_gather(
        files.damaged_files(folder, metadata, verify, *_rank_and_world())) for p in part})
    if problems:
        raise CheckpointDamagedError(f"checkpoint {folder!r} is damaged: " + "; ".join(problems)
                                     + ". Restore the file from a copy of the checkpoint, or "
                                     "load an earlier checkpoint")
    try:
        dcp.load(state, checkpoint_id=folder)
    except (Exception, CheckpointException) as error:  # the latter is a BaseException
        raise CheckpointDamagedError(
            f"checkpoint {folder!r} could not be read ({type(error).__name__}: {error}), "
            f"though its data files passed the size{' and checksum' if verify else ''} checks"
        ) from error
    if optimizer is not None:
        _restore_optimizer_views(model, optimizer, state)
    return None if extra is None else _nested_extra(extra, state)


def _flat_extra(extra: dict | None, pickled: bool, prefix: str = "extra") -> dict:
    """``extra`` as DCP entries: ``{"extra.a.b": tensor | bytes}``. A non-tensor leaf is pickled
    here (``pickled``; on load a placeholder): DCP would otherwise split lists of tensors."""
    flat = {}
    for key, value in (extra or {}).items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(_flat_extra(value, pickled, name))
        elif torch.is_tensor(value):
            flat[name] = value
        else:
            flat[name] = pickle.dumps(value) if pickled else b""
    return flat


def _nested_extra(extra: dict, state: dict, prefix: str = "extra") -> dict:
    """What was loaded, in ``extra``'s structure: tensors (loaded in place), unpickled objects."""
    out = {}
    for key, value in extra.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out[key] = _nested_extra(value, state, name)
        else:
            out[key] = value if torch.is_tensor(value) else pickle.loads(state[name])
    return out


def _check_fits(folder: str, saved: dict, state: dict) -> None:
    """Every key of ``state`` is in the checkpoint at the same full shape, and every parameter
    of the checkpoint is in ``state``. The keys are those of every rank (a pipeline stage holds
    some), so every rank raises the same error."""
    mine = {key: tuple(value.shape) if torch.is_tensor(value) else None  # a DTensor's: the full
            for key, value in state.items()}
    expected = {key: shape for part in _all_gather(mine) for key, shape in part.items()}
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    # Optimizer state nobody asked for is fine (loading the weights alone); parameters the model
    # lacks are not: the checkpoint is of another model, and loading part of it is a silent bug.
    if missing or any(key.startswith("model.") for key in unexpected):
        if missing and all(key.startswith("optim.") for key in missing) and \
                not any(key.startswith("optim.") for key in saved):
            hint = "It was saved without an optimizer: load it with optimizer=None"
        else:
            hint = ("It was saved from another model (other layers, or renamed parameters): "
                    "load it into the model it was saved from")
        found = [f"{what} {len(keys)} key(s) {whose}: {_some(list(map(repr, keys)))}"
                 for what, keys, whose in (("lacks", missing, "the model expects"),
                                           ("holds", unexpected, "the model does not have"))
                 if keys]
        raise CheckpointMismatchError(f"checkpoint {folder!r} does not match the model: it "
                                      f"{'; it '.join(found)}. {hint}")
    wrong = [f"{key!r} saved as {tuple(saved[key].size)}, expected {shape}"
             for key, shape in sorted(expected.items())
             if shape is not None and hasattr(saved[key], "size")
             and tuple(saved[key].size) != shape]
    if wrong:
        raise CheckpointMismatchError(
            f"checkpoint {folder!r} has tensors of other full (unsharded) shapes than the "
            f"model: {_some(wrong)}. It was saved from a different model config (vocab size, "
            "hidden size, ...): build the model with the config it was saved with")


def _some(items: list[str], shown: int = 5) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _restore_optimizer_views(model, optimizer, state) -> None:
    """DCP may replace non-tensor-shaped entries (the scalar ``step``); put values back."""
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state[p].items():
                loaded = state[f"optim.{names[id(p)]}.{key}"]
                loaded = loaded.to_local() if hasattr(loaded, "to_local") else loaded
                if loaded is not value:
                    value.copy_(loaded)


def full_state_dict(model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """Every parameter at full size, whatever the layout (for export): TP shards gathered, and
    under pipeline parallelism the stages' parameters (those ``optimizer`` holds) merged from
    every stage. A collective over the TP and PP groups."""
    group = _tp_group()
    out = {}
    for name, p in _owned(model, optimizer):
        dim = getattr(p, "tp_shard_dim", None)
        out[name] = p.detach().clone() if dim is None or group is None else \
            comm.all_gather(p.detach(), dim, group)
    from parallelkit.distributed import mpu

    if mpu.is_initialized() and mpu.get_pp_world_size() > 1:
        stages = [None] * mpu.get_pp_world_size()
        dist.all_gather_object(stages, out, group=mpu.get_pp_group())
        out = {name: t for stage in stages for name, t in stage.items()}
    return out
