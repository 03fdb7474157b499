"""Checkpoints that load at another layout, with ``torch.distributed.checkpoint`` (DCP).

Every tensor-parallel shard (a parameter with ``tp_shard_dim``) is described to DCP as a DTensor
``Shard(dim)`` over the TP group, and everything else as replicated, so DCP records the full
shapes and where each piece lives. Loading builds the same description for the *current* layout
and DCP reads exactly the slices each rank needs: save at tp=2, load at tp=4, at tp=1, or into
the dense model in a single process. Data-parallel replicas write once (DCP deduplicates them).

Optimizer state is saved next to the parameters for optimizers whose state is per-parameter
tensors shaped like the parameter plus a scalar ``step`` (Adam, AdamW, SGD with momentum).

Under pipeline parallelism each rank saves and loads only the parameters its optimizer holds
(its stages), under their names in the whole model, so the union over ranks is the model and a
checkpoint saved at pp=2 loads at pp=1, or the other way round.

A save goes to a temporary folder that is renamed into place only after every rank has written,
so a failed save never leaves a folder that loads as complete.
"""

from __future__ import annotations

import os
import shutil
import uuid

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from parallelkit.distributed import comm

METADATA = ".metadata"  # DCP writes it last: without it a checkpoint is incomplete


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
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write a checkpoint folder at ``path`` (a collective when distributed)."""
    staging = _staging_path(path)
    dcp.save(sharded_state_dict(model, optimizer), checkpoint_id=staging)
    if _distributed():
        dist.barrier()  # every rank has written its files
    if not _distributed() or dist.get_rank() == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    if _distributed():
        dist.barrier()


def _staging_path(path: str) -> str:
    token = [uuid.uuid4().hex[:8]]
    if _distributed():
        dist.broadcast_object_list(token, src=0)  # one staging folder for all ranks
    return f"{path.rstrip('/')}.incomplete-{token[0]}"


def load_checkpoint(path: str, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load ``path`` into ``model`` (and ``optimizer``) at the current layout, in place."""
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise FileNotFoundError(f"no complete checkpoint at {path!r} (no {METADATA} file): it "
                                "does not exist or its save did not finish")
    state = sharded_state_dict(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as error:  # the latter is a BaseException
        raise RuntimeError(f"checkpoint {path!r} could not be read ({type(error).__name__}: "
                           f"{error}); a data file is missing or truncated") from error
    if optimizer is not None:
        _restore_optimizer_views(model, optimizer, state)


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
