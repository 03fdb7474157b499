"""Gradient buckets: parameters packed into flat buffers so that one collective syncs many of them.

A bucket owns one contiguous 1-D gradient buffer ``grad_data`` and every ``param.grad`` in it is a
view into that buffer, so autograd accumulates straight into what the collective sends (no copy).
A bucket of bf16/fp16 parameters may instead hold fp32 *main grads* (see ``precision.py``): then
``param.main_grad`` is the view and ``param.grad`` is only each backward's half-precision gradient,
which the wrapper adds into it. Every bucketed parameter has ``param.main_grad`` (the same view
as ``param.grad`` when the dtypes agree); :func:`accumulated_grad` is what optimizers and clipping
read.
With the distributed optimizer the bucket also owns ``param_data``: ``param.data`` are views into
it, so the updated parameter shards are all-gathered straight into the parameters.

Buckets are planned in reverse parameter order: autograd produces gradients roughly from the last
layer to the first, so the first bucket is complete early in backward and its collective overlaps
the rest of it. Expert-parallel parameters (:func:`is_expert_parallel`) never share a bucket with
dense ones: their replicas are another group (expert DP), so their bucket's ``group`` is.

Every rank of the group must build the same buckets, or a collective receives a size it did not
expect and the backend aborts the process. :func:`check_replicas_agree` proves they do (one
all-gather of a fixed-size digest) and names the first difference otherwise;
:func:`broadcast_from_first_rank_` makes the replicas' values start equal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.distributed import comm

# torch DDP's default: big enough that each bucket's collective runs near link speed, small
# enough that the first bucket is ready early in backward.
DEFAULT_BUCKET_BYTES = 25 * 2**20
# What a gradient bucket can hold: the dtypes torch's collectives reduce on both gloo and NCCL.
BUCKET_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
                 torch.complex128)


def is_expert_parallel(param: torch.Tensor) -> bool:
    """Whether ``param`` is one rank's share of the experts (``param.expert_parallel``, set by
    :class:`~parallelkit.moe.experts.ExpertParallelExperts`): replicated over the expert-DP
    group, not the dense DP group, and distinct across the expert tp x ep x pp group."""
    return getattr(param, "expert_parallel", False)


def plan_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Group ``params`` (model order) into buckets, last parameter first.

    A bucket closes once it holds ``bucket_bytes`` or more, or when the dtype, the device or
    :func:`is_expert_parallel` changes (one flat buffer has one of each, and one group), so a
    bucket exceeds ``bucket_bytes`` by at most its last parameter.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} must be a positive integer number of "
                         f"bytes (default {DEFAULT_BUCKET_BYTES} = 25 MiB)")
    buckets: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    size = 0
    for param in reversed(params):
        if current and (size >= bucket_bytes or param.dtype != current[0].dtype
                        or param.device != current[0].device
                        or is_expert_parallel(param) != is_expert_parallel(current[0])):
            buckets.append(current)
            current, size = [], 0
        current.append(param)
        size += param.numel() * param.element_size()
    if current:
        buckets.append(current)
    return buckets


@dataclass
class Bucket:
    """One flat gradient buffer and the parameters whose gradients are views into it.

    ``grad_data``: ``[numel]``, ``numel`` = the parameters' total rounded up to a multiple of
    ``shards`` (the size of ``group`` with the distributed optimizer, else 1), so it splits into
    equal shards; the padding stays zero. ``offsets[i]`` is where ``params[i]`` starts.
    ``group``: the replicas the bucket is reduced (and, with ZeRO, sharded and gathered) over: the
    dense DP (x CP) group, or the expert-DP group for expert-parallel parameters.
    """

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    grad_data: torch.Tensor
    shards: int = 1
    param_dtype: torch.dtype | None = None  # the parameters' dtype when built; default grad_data's
    param_data: torch.Tensor | None = None  # [numel], only with the distributed optimizer
    grad_shard: torch.Tensor | None = None  # [numel/shards], the reduce-scatter output
    group: dist.ProcessGroup | None = None
    # Per synchronisation round: parameters whose last gradient arrived, and the collective.
    ready: set[int] = field(default_factory=set)
    handle: comm.Handle | None = None

    def __post_init__(self):
        self._position_of = {id(param): i for i, param in enumerate(self.params)}
        if self.param_dtype is None:
            self.param_dtype = self.grad_data.dtype

    @classmethod
    def create(cls, index: int, params: list[nn.Parameter], shards: int = 1,
               own_params: bool = False, grad_dtype: torch.dtype | None = None,
               group: dist.ProcessGroup | None = None) -> "Bucket":
        """Allocate the buffers (the gradients in ``grad_dtype``, default the parameters') and
        point every gradient (and ``param.data`` when ``own_params``) at its slice."""
        offsets, total = [], 0
        for param in params:
            offsets.append(total)
            total += param.numel()
        numel = -(-total // shards) * shards
        like = params[0]
        grad_data = torch.zeros(numel, dtype=grad_dtype or like.dtype, device=like.device)
        bucket = cls(index, params, offsets, grad_data, shards, param_dtype=like.dtype,
                     group=group)
        if own_params:
            bucket.param_data = torch.zeros(numel, dtype=like.dtype, device=like.device)
            bucket.grad_shard = grad_data.new_zeros(numel // shards)
            for param, offset in zip(params, offsets):
                view = bucket._slice(bucket.param_data, param, offset)
                view.copy_(param.detach())
                param.data = view
        for param in params:
            bucket.point_grads_at_buffer(param)
        return bucket

    @property
    def holds_main_grads(self) -> bool:
        """Whether the buffer is wider than the parameters (fp32 for bf16/fp16 parameters)."""
        return self.grad_data.dtype != self.param_dtype

    def point_grads_at_buffer(self, param: nn.Parameter) -> None:
        """``param.main_grad`` becomes its view; so does ``param.grad`` unless the bucket holds
        main grads, where ``param.grad`` is None until the next backward produces one."""
        param.main_grad = self.grad_view(param)
        param.grad = None if self.holds_main_grads else param.main_grad

    @property
    def numel(self) -> int:
        return self.grad_data.numel()

    @property
    def shard_numel(self) -> int:
        return self.numel // self.shards

    def grad_view(self, param: nn.Parameter) -> torch.Tensor:
        """``param``'s gradient slice of ``grad_data``, shaped like ``param``."""
        return self._slice(self.grad_data, param, self.offsets[self._position(param)])

    def param_range(self, param: nn.Parameter) -> tuple[int, int]:
        """``[start, end)`` of ``param`` in the flat buffers."""
        start = self.offsets[self._position(param)]
        return start, start + param.numel()

    def shard_pieces(self, shard: int) -> list[tuple[nn.Parameter, int, int]]:
        """The parameters that overlap shard ``shard``: ``(param, start, end)`` with the overlap
        ``[start, end)`` in bucket coordinates (the padding belongs to no parameter)."""
        lo, hi = shard * self.shard_numel, (shard + 1) * self.shard_numel
        pieces = []
        for param, offset in zip(self.params, self.offsets):
            start, end = max(lo, offset), min(hi, offset + param.numel())
            if start < end:
                pieces.append((param, start, end))
        return pieces

    def _position(self, param: nn.Parameter) -> int:
        return self._position_of[id(param)]

    @staticmethod
    def _slice(flat: torch.Tensor, param: nn.Parameter, offset: int) -> torch.Tensor:
        return flat[offset:offset + param.numel()].view_as(param)


def accumulated_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient an optimizer steps with: ``param.main_grad`` where a bucket gave it one
    (None when no rank computed a gradient for it), else ``param.grad``."""
    return param.main_grad if hasattr(param, "main_grad") else param.grad


# --- Replica agreement: checks and syncs that keep a bucket's collective from ever mismatching ---


def describe_tensor(tensor: torch.Tensor) -> str:
    """``(8, 4) float32``: what a rank says about a tensor when replicas are compared."""
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def check_replicas_agree(what: str, entries: list[tuple[str, str]], group: dist.ProcessGroup, *,
                         fix: str, local_error: str | None = None) -> None:
    """Raise ValueError on every rank of ``group`` unless all of them passed equal ``entries``
    (``(key, description)`` pairs, in order) and none passed a ``local_error``.

    The common case costs one all-gather of 3 int64 per rank (count, digest, error flag): its size
    does not depend on the entries, so the check itself cannot abort on the mismatch it looks for.
    Only on a disagreement are the full lists gathered, to name the first difference.
    """
    if dist.get_world_size(group) == 1:
        if local_error is not None:
            raise ValueError(f"{what}: {local_error}")
        return
    device = comm.metadata_device(group)
    text = json.dumps({"entries": entries, "error": local_error})
    digest = int.from_bytes(hashlib.blake2b(json.dumps(entries).encode(), digest_size=8).digest(),
                            "little", signed=True)
    mine = torch.tensor([[len(entries), digest, local_error is not None]], device=device)
    rows = comm.all_gather(mine, 0, group).tolist()
    if all(row == rows[0] for row in rows) and local_error is None:
        return
    replicas = [json.loads(payload) for payload in _all_gather_bytes(text.encode(), group, device)]
    ranks = dist.get_process_group_ranks(group)
    errors = [f"rank {rank}: {r['error']}" for rank, r in zip(ranks, replicas) if r["error"]]
    if errors:
        raise ValueError(f"{what}: " + "; ".join(errors))
    raise ValueError(f"{what}: data-parallel ranks disagree on "
                     f"{_first_difference([r['entries'] for r in replicas], ranks)}; {fix}")


def _first_difference(replicas: list[list[list[str]]], ranks: list[int]) -> str:
    """``parameter 'w': rank 0 has (8, 4) float32, rank 1 has (8, 6) float32``."""
    described = [dict(entries) for entries in replicas]
    keys = list(dict.fromkeys(key for entries in replicas for key, _ in entries))
    for key in keys:
        values = [d.get(key, "nothing") for d in described]
        if len(set(values)) > 1:
            return f"{key}: {_who_has(values, ranks)}"
    for position in range(max(len(entries) for entries in replicas)):
        values = [entries[position][0] if position < len(entries) else "nothing"
                  for entries in replicas]
        if len(set(values)) > 1:
            return f"the order, at position {position}: {_who_has(values, ranks)}"
    return "nothing they could name (a digest collision)"


def _who_has(values: list[str], ranks: list[int]) -> str:
    by_value: dict[str, list[int]] = {}
    for rank, value in zip(ranks, values):
        by_value.setdefault(value, []).append(rank)
    return ", ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} "
                     f"{'have' if len(rs) > 1 else 'has'} {value}"
                     for value, rs in by_value.items())


def _all_gather_bytes(payload: bytes, group: dist.ProcessGroup,
                      device: torch.device) -> list[bytes]:
    """Every member's ``payload``, in group-rank order (lengths first, then padded bytes)."""
    size = torch.tensor([len(payload)], device=device)
    sizes = comm.all_gather(size, 0, group).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    gathered = comm.all_gather(padded[None], 0, group).cpu()
    return [bytes(row[:n].tolist()) for row, n in zip(gathered, sizes)]


def unsyncable_parameter(module: nn.Module, group: dist.ProcessGroup) -> str | None:
    """Why this rank's ``module`` cannot be bucketed and synced over ``group``, or None (a
    message for :func:`check_replicas_agree`, so that every rank raises it, not just this one)."""
    nccl = dist.get_backend(group) == "nccl"
    for name, param in module.named_parameters():
        if param.device.type == "meta":
            return (f"parameter {name!r} is on the meta device: materialise the model "
                    "(module.to_empty(device=...) and initialise it) before wrapping it")
        if nccl and param.device.type != "cuda":
            return (f"parameter {name!r} is on {param.device}, but the group's backend is NCCL, "
                    "which needs CUDA tensors: move the model to its GPU before wrapping it")
        if param.requires_grad and param.dtype not in BUCKET_DTYPES:
            return (f"trainable parameter {name!r} has dtype {param.dtype}, which a gradient "
                    f"bucket cannot reduce ({', '.join(map(str, BUCKET_DTYPES))}): convert it "
                    "or freeze it (requires_grad=False)")
    for name, child in module.named_modules():
        if getattr(child, "sparse", False) is True and any(
                p.requires_grad for p in child.parameters(recurse=False)):
            return (f"module {name!r} makes sparse gradients (sparse=True), which a gradient "
                    "bucket cannot hold: build it with sparse=False")
    return None


@torch.no_grad()
def broadcast_from_first_rank_(tensors: list[torch.Tensor], group: dist.ProcessGroup,
                               chunk_bytes: int) -> None:
    """Overwrite ``tensors`` on every rank with the group's first rank's values: one broadcast
    per flat chunk of about ``chunk_bytes`` of one dtype and device."""
    source = dist.get_global_rank(group, 0)
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_kind.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for same in by_kind.values():
        start, size = 0, 0
        for end, tensor in enumerate(same, 1):
            size += tensor.numel() * tensor.element_size()
            if size >= chunk_bytes or end == len(same):
                chunk = same[start:end]
                flat = torch._utils._flatten_dense_tensors([t.detach() for t in chunk])
                comm.record_traffic("broadcast", flat.numel() * flat.element_size(), group)
                # Sizes already proven equal by check_replicas_agree; comm.py has no broadcast.
                dist.broadcast(flat, source, group=group)
                for t, value in zip(chunk, torch._utils._unflatten_dense_tensors(flat, chunk)):
                    t.copy_(value)
                start, size = end, 0
