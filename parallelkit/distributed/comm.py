"""Collectives on parallelkit's groups. The one module that talks to the communication backend.

No function modifies its input (with a group of one it may return it), so autograd Functions can
call them on tensors autograd still needs. ``count_traffic()`` records what every collective moved, which is how the
benchmarks show that a layer communicates no more than its algorithm needs.

Do the ranks agree? A collective whose members pass different sizes does not fail cleanly: gloo
aborts the process ("Received data size doesn't match expected size"), NCCL reads garbage or
hangs, and a rank whose own input check raises leaves its peers waiting forever. So every op
that communicates first calls :func:`check_ranks_agree` with its shapes, dtypes and options (and
its local input checks): one all-gather of a fixed-size int64 digest per op call, which cannot
itself mismatch. When the digests differ, the readable values are gathered (an object gather,
safe for unequal sizes) and every member raises the same error naming each rank's value:

    ParallelRMSNorm: tensor-parallel ranks disagree on the input shape: rank 0 has (6, 2, 16),
    rank 1 has (4, 2, 16); every TP rank must pass the same tokens (same sequence length and batch)

``all_reduce``, ``all_gather``, ``reduce_scatter`` and ``all_to_all`` below check their own
arguments the same way, except inside :func:`entry_checked` (an op that checked at its entry).

The switch: checking is on by default for gloo groups (CPU, where the exchange costs little)
and off for NCCL groups, where it costs a host synchronization per op call.
``PARALLELKIT_CHECK_COLLECTIVES=1`` or ``=0`` turns it on or off everywhere, and
``with comm.validation(True):`` (or ``False``) overrides both inside a block, on this rank (every
rank of a group must make the same choice, or their collectives no longer pair up).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# torch 2.14 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Traffic:
    """Payload bytes per collective kind: the all-reduced tensor, the gathered output, the
    reduce-scattered input. ``wire_bytes`` converts them to what each rank sends on a ring."""

    payload: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    wire: float = 0.0

    def add(self, kind: str, nbytes: int, group_size: int) -> None:
        self.payload[kind] += nbytes
        self.calls[kind] += 1
        share = (group_size - 1) / group_size  # ring: each rank sends (p-1)/p of the payload ...
        self.wire += nbytes * share * (2 if kind == "all_reduce" else 1)  # ... twice to all-reduce


_traffic: Traffic | None = None


@contextlib.contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count every collective issued through this module inside the block (on this rank)."""
    global _traffic
    outer, _traffic = _traffic, Traffic()
    try:
        yield _traffic
    finally:
        _traffic = outer


def record_traffic(kind: str, nbytes: int, group: dist.ProcessGroup) -> None:
    """Count a collective's payload (also called by native ops that communicate themselves)."""
    if _traffic is not None:
        _traffic.add(kind, nbytes, dist.get_world_size(group))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def group_name(group: dist.ProcessGroup) -> str:
    """The name a dispatcher op takes a process group by (as torch's functional collectives
    do; c10d resolves it back)."""
    return dist.distributed_c10d._get_process_group_name(group)


def group_by_name(name: str) -> dist.ProcessGroup:
    """The process group :func:`group_name` named."""
    return dist.distributed_c10d._resolve_process_group(name)


def compiling() -> bool:
    """Inside ``torch.compile``'s tracing: collectives go through torch's functional
    collectives (which the compiler understands) and the ranks-agree checks, which gather
    Python objects, are left out of the graph (they run in eager steps)."""
    return torch.compiler.is_compiling()


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup, op: str = "sum") -> torch.Tensor:
    """Elementwise ``op`` ("sum" or "max") of ``x`` over the group, on every member."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"op={op!r} must be one of {sorted(_REDUCE_OPS)}")
    if dist.get_world_size(group) == 1:
        return x
    if compiling():
        return funcol.all_reduce(x, op, group)
    _check_collective(group, "all_reduce", x, op=op)
    out = x.contiguous().clone()
    record_traffic("all_reduce", _nbytes(out), group)
    dist.all_reduce(out, op=_REDUCE_OPS[op], group=group)
    return out


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Members' ``x`` concatenated along ``dim`` in group-rank order: size p * x.size(dim)."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    if compiling():
        return funcol.all_gather_tensor(x.contiguous(), dim, group)
    _check_collective(group, "all_gather", x, dim=dim)
    front = x.movedim(dim, 0).contiguous()  # the single-tensor collective stacks along dim 0
    out = front.new_empty((p * front.shape[0], *front.shape[1:]))
    record_traffic("all_gather", _nbytes(out), group)
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This member's chunk (group-rank order) along ``dim`` of the sum of ``x`` over the group."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    if compiling():
        check_divisible(x, dim, p, "reduce-scatter")
        return funcol.reduce_scatter_tensor(x.contiguous(), "sum", dim, group)
    _check_collective(group, "reduce_scatter", x,
                      lambda: check_divisible(x, dim, p, "reduce-scatter"), dim=dim)
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // p, *front.shape[1:]))
    record_traffic("reduce_scatter", _nbytes(front), group)
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


def split(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This member's chunk of ``x`` along ``dim`` (no communication)."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    check_divisible(x, dim, p, "split")
    return x.chunk(p, dim)[dist.get_rank(group)].contiguous()


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int,
               group: dist.ProcessGroup) -> torch.Tensor:
    """Chunk ``x`` along ``scatter_dim`` and send chunk i to group rank i; concatenate the chunks
    received, in rank order, along ``gather_dim``."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    if compiling():
        check_divisible(x, scatter_dim, p, "all-to-all")
        front = funcol.all_to_all_single(x.movedim(scatter_dim, 0).contiguous(), None, None,
                                         group)
        return torch.cat(front.movedim(0, scatter_dim).chunk(p, scatter_dim), gather_dim)
    _check_collective(group, "all_to_all", x,
                      lambda: check_divisible(x, scatter_dim, p, "all-to-all"),
                      scatter_dim=scatter_dim, gather_dim=gather_dim)
    # all_to_all_single exchanges slabs of dim 0: put the scattered dim first.
    front = x.movedim(scatter_dim, 0).contiguous()
    received = torch.empty_like(front)
    record_traffic("all_to_all", _nbytes(front), group)
    dist.all_to_all_single(received, front, group=group)
    chunks = received.movedim(0, scatter_dim).chunk(p, scatter_dim)
    return torch.cat(chunks, gather_dim)


def _check_collective(group, what: str, x: torch.Tensor, check=None, **options) -> None:
    """This module's own ranks-agree check, skipped inside an op that checked at its entry."""
    if getattr(_local, "entry_checked", 0):
        if check is not None:
            check()
        return
    dims = {k: v % max(x.dim(), 1) for k, v in options.items() if k.endswith("dim")}
    check_ranks_agree(group, f"comm.{what}", check=check, shape=x.shape, dtype=x.dtype,
                      **{**options, **dims},
                      fix="every member must pass a tensor of the same shape and dtype")


def check_divisible(x: torch.Tensor, dim: int, parts: int, what: str) -> None:
    if x.shape[dim] % parts:
        raise ValueError(f"cannot {what} a tensor of shape {tuple(x.shape)} along dim {dim} into "
                         f"{parts} equal parts: {x.shape[dim]} is not divisible by {parts}; "
                         f"pad or choose a size divisible by the group size")


def group_members(group: dist.ProcessGroup, device: torch.device | str = "cpu") -> list[int]:
    """Global ranks of the processes that actually answer a collective on ``group``.

    Each member adds 1 at its own global rank to a vector all-reduced (SUM) over the group by the
    native op, so the result proves membership through the communicator itself rather than
    trusting its bookkeeping. A count other than 0 or 1 means a broken group and raises.
    """
    from parallelkit._native import native

    counts = native.group_membership(group, dist.get_rank(), dist.get_world_size(),
                                     torch.device(device)).tolist()
    if any(c not in (0, 1) for c in counts):
        raise RuntimeError(f"group membership counts {counts} are not all 0 or 1: some rank "
                           "joined the all-reduce twice or with another group")
    return [rank for rank, count in enumerate(counts) if count == 1]


# --- Do the ranks agree? (see the module docstring) -----------------------------------------------

CHECK_ENV = "PARALLELKIT_CHECK_COLLECTIVES"
_validation: list[bool] = []  # the open validation() blocks' settings, innermost last
_local = threading.local()  # entry_checked depth, per thread: a backward may run on another

# How error messages name a group the MPU made, by kind (first match wins: kinds may share one).
_GROUP_NAMES = {"tp": "tensor-parallel", "cp": "context-parallel", "pp": "pipeline-parallel",
                "dp": "data-parallel", "dp_cp": "data x context-parallel",
                "tp_cp": "tensor x context-parallel", "mp": "model-parallel"}


@contextlib.contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Turn the ranks-agree checks on or off inside the block, for the whole process (backward
    threads included), over the env var and the default."""
    _validation.append(bool(enabled))
    try:
        yield
    finally:
        _validation.pop()


def validation_enabled(group: dist.ProcessGroup | None = None) -> bool:
    """Whether ops on ``group`` check that its ranks agree: a :func:`validation` block, else
    ``PARALLELKIT_CHECK_COLLECTIVES``, else on for gloo and off for NCCL."""
    if compiling():
        return False
    if _validation:
        return _validation[-1]
    setting = os.environ.get(CHECK_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ValueError(f"{CHECK_ENV}={setting!r} must be 0 (off), 1 (on) or unset (on for "
                         "gloo groups, off for NCCL ones)")
    return "nccl" not in dist.get_backend(group)


@contextlib.contextmanager
def entry_checked() -> Iterator[None]:
    """Inside the block this module's collectives skip their own check: the op around them
    checked its inputs at entry, and its collectives' shapes follow from those."""
    if compiling():  # a compiled graph has no checks to skip
        yield
        return
    _local.entry_checked = getattr(_local, "entry_checked", 0) + 1
    try:
        yield
    finally:
        _local.entry_checked -= 1


def check_ranks_agree(group: dist.ProcessGroup, what: str, *, fix: str = "",
                      ranks: str | None = None, check: Callable[[], Any] | None = None,
                      **values) -> None:
    """Raise on every member of ``group`` unless all passed equal ``values`` and ``check`` passed.

    ``values`` (ints, floats, strings, None, dtypes, shapes, tuples) are named by their keyword,
    underscores read as spaces: ``input_shape=x.shape`` is "the input shape". ``check``, this
    rank's local input checks, runs first; if it raises on any member, that member re-raises its
    error and the others raise the same type naming it, so no rank is left waiting. ``ranks``
    names the group in messages ("tensor-parallel"; default: looked up in the MPU), ``fix``
    ends the message. Off (``check`` alone runs) when :func:`validation_enabled` is False.
    """
    p = dist.get_world_size(group)
    if p == 1 or not validation_enabled(group):
        if check is not None:
            check()
        return
    error = None
    if check is not None:
        try:
            check()
        except Exception as exc:  # every member must hear of it before anyone raises
            error = exc
    mine = {key.replace("_", " "): _plain(value) for key, value in values.items()}
    failure = None if error is None else (type(error).__name__, str(error))
    digest = hashlib.blake2b(repr((what, mine, failure is not None)).encode(), digest_size=8)
    device = metadata_device(group)
    sent = torch.tensor([int.from_bytes(digest.digest(), "little", signed=True)], device=device)
    digests = torch.empty(p, dtype=torch.int64, device=device)
    _all_gather_single(digests, sent, group=group)
    if bool((digests == digests[0]).all()):
        if error is not None:  # every member failed its own check alike
            raise error
        return
    # Someone differs: gather the readable values (an object gather pads to the longest).
    everyone: list = [None] * p
    dist.all_gather_object(everyone, (what, mine, failure), group=group)
    if error is not None:
        raise error
    raise _disagreement(group, what, everyone, fix, ranks)


def all_gather_ints(group: dist.ProcessGroup, *values: int) -> tuple:
    """Every member's ``values`` in group-rank order: a tuple of ints per member when several are
    given, else one int per member. Every member must pass as many; metadata, so not counted
    by :func:`count_traffic`. On the GPU it waits for the result (a host sync)."""
    p, device = dist.get_world_size(group), metadata_device(group)
    sent = torch.tensor(values, dtype=torch.int64, device=device)
    if p == 1:
        gathered = sent[None]
    else:
        gathered = torch.empty(p, len(values), dtype=torch.int64, device=device)
        _all_gather_single(gathered, sent[None], group=group)
    rows = [tuple(row) for row in gathered.tolist()]
    return tuple(rows) if len(values) > 1 else tuple(row[0] for row in rows)


def all_gather_objects(group: dist.ProcessGroup, value: Any) -> list:
    """Every member's picklable ``value``, in group-rank order: setup metadata (addresses, host
    names), not counted by :func:`count_traffic`. Members may pass values of unequal sizes."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def _plain(value):
    """``value`` as plain picklable data with the same repr on every rank."""
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, float):
        return float(value)
    return value


def metadata_device(group: dist.ProcessGroup) -> torch.device:
    """Where a tiny metadata tensor for ``group`` lives: the CPU, unless the group runs NCCL
    only (then the group's bound device, else the current CUDA device)."""
    backend = dist.get_backend(group)
    if "nccl" not in backend or "gloo" in backend:
        return torch.device("cpu")
    bound = getattr(group, "bound_device_id", None)
    return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())


def _disagreement(group, what, everyone, fix, ranks) -> Exception:
    labels = rank_labels(group)
    name = _group_name(group) if ranks is None else ranks
    members = f"{name} ranks" if name else "ranks"
    failed = [(i, f) for i, (_, _, f) in enumerate(everyone) if f is not None]
    if failed:
        i, (kind, message) = failed[0]
        error_type = {"TypeError": TypeError, "IndexError": IndexError}.get(kind, ValueError)
        return error_type(f"{what}: {name + ' ' if name else ''}{labels[i]} rejected its input, "
                          f"so every rank stops here rather than wait for it: {kind}: {message}")
    whats = [w for w, _, _ in everyone]
    if len(set(whats)) > 1:
        return ValueError(f"{members} are in different operations: " + ", ".join(
            f"{labels[i]} in {w}" for i, w in enumerate(whats)) + "; every rank of a group must "
            "make the same collective calls in the same order")
    keys = list(dict.fromkeys(k for _, mine, _ in everyone for k in mine))
    parts = []
    for key in keys:
        seen = [mine.get(key, "nothing") for _, mine, _ in everyone]
        if len({repr(v) for v in seen}) > 1:
            parts.append(f"the {key}: " + ", ".join(
                f"{labels[i]} has {v if isinstance(v, str) else repr(v)}"
                for i, v in enumerate(seen)))
    if not parts:  # equal values, unequal digests: cannot happen short of a broken pickle
        parts = [f"their arguments: {[mine for _, mine, _ in everyone]}"]
    text = f"{what}: {members} disagree on " + "; and on ".join(parts)
    return ValueError(text + (f"; {fix}" if fix else ""))


def rank_labels(group) -> list[str]:
    """'rank i' per group rank, with the global rank where it differs."""
    world = dist.get_process_group_ranks(group)
    return [f"rank {i}" if g == i else f"rank {i} (global rank {g})" for i, g in enumerate(world)]


def _group_name(group) -> str:
    """The MPU's name for ``group`` ("tensor-parallel"), or "" for the world or an unknown one."""
    from parallelkit.distributed import mpu  # only on the error path; mpu imports this module

    if mpu.is_initialized():
        state = mpu.current()
        for kind, name in _GROUP_NAMES.items():
            if getattr(state, kind).group is group:
                return name
    return ""


# --- Flat buffers, asynchronously: data parallelism's gradient and parameter buckets -------------
# Unlike the functions above, these write into buffers the caller owns (a bucket's flat gradient
# or parameter storage, tens of MB): that is their point, no copy per bucket. Each returns a
# handle at once so the caller can keep computing (the rest of backward) while the bytes move;
# where validation is on, the ranks-agree check before it is a blocking exchange.


class Handle:
    """A collective in flight. ``wait()`` blocks until its output is written, then returns it."""

    def __init__(self, work: dist.Work | None, result: torch.Tensor):
        self._work, self.result = work, result

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self.result


def _check_flat(buffer: torch.Tensor, what: str) -> None:
    if buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(f"{what} needs a contiguous 1-D buffer, got shape {tuple(buffer.shape)} "
                         f"(contiguous={buffer.is_contiguous()})")


def all_reduce_async_(buffer: torch.Tensor, group: dist.ProcessGroup) -> Handle:
    """Sum ``buffer`` [n] over the group, in place; the handle's ``wait()`` returns ``buffer``."""
    if dist.get_world_size(group) == 1:
        _check_flat(buffer, "all_reduce_async_")
        return Handle(None, buffer)
    _check_collective(group, "all_reduce_async_", buffer,
                      lambda: _check_flat(buffer, "all_reduce_async_"))
    record_traffic("all_reduce", _nbytes(buffer), group)
    return Handle(dist.all_reduce(buffer, group=group, async_op=True), buffer)


def reduce_scatter_async(buffer: torch.Tensor, out: torch.Tensor,
                         group: dist.ProcessGroup) -> Handle:
    """``out`` [n/p] ← this member's chunk (group-rank order) of the sum of ``buffer`` [n].

    ``buffer`` is left as it was; ``out`` must not overlap it (gloo does not promise in-place).
    """
    p = dist.get_world_size(group)

    def local_checks():
        _check_flat(buffer, "reduce_scatter_async")
        check_divisible(buffer, 0, p, "reduce-scatter")
        if out.shape != (buffer.numel() // p,):
            raise ValueError(f"reduce_scatter_async: out has shape {tuple(out.shape)}, expected "
                             f"({buffer.numel() // p},): the buffer's {buffer.numel()} elements "
                             f"over the group's {p} members")

    if p == 1:
        local_checks()
        out.copy_(buffer)
        return Handle(None, out)
    _check_collective(group, "reduce_scatter_async", buffer, local_checks)
    record_traffic("reduce_scatter", _nbytes(buffer), group)
    return Handle(_reduce_scatter_single(out, buffer, group=group, async_op=True), out)


def all_gather_async_(buffer: torch.Tensor, group: dist.ProcessGroup) -> Handle:
    """Fill ``buffer`` [n] in place from every member's own chunk ``buffer.chunk(p)[rank]``.

    In place on purpose (the chunk is a view of the output, which NCCL and gloo both support): a
    distributed optimizer gathers updated parameter shards straight into the parameters' storage.
    """
    p = dist.get_world_size(group)

    def local_checks():
        _check_flat(buffer, "all_gather_async_")
        check_divisible(buffer, 0, p, "all-gather")

    if p == 1:
        local_checks()
        return Handle(None, buffer)
    _check_collective(group, "all_gather_async_", buffer, local_checks)
    record_traffic("all_gather", _nbytes(buffer), group)
    shard = buffer.chunk(p)[dist.get_rank(group)]
    return Handle(_all_gather_single(buffer, shard, group=group, async_op=True), buffer)
