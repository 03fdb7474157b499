"""Gradient buckets: parameters packed into flat buffers so that one collective syncs many of them.

A bucket owns one contiguous 1-D gradient buffer ``grad_data`` and every ``param.grad`` in it is a
view into that buffer, so autograd accumulates straight into what the collective sends (no copy).
With the distributed optimizer the bucket also owns ``param_data``: ``param.data`` are views into
it, so the updated parameter shards are all-gathered straight into the parameters.

Buckets are planned in reverse parameter order: autograd produces gradients roughly from the last
layer to the first, so the first bucket is complete early in backward and its collective overlaps
the rest of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from parallelkit.distributed import comm

# torch DDP's default: big enough that each bucket's collective runs near link speed, small
# enough that the first bucket is ready early in backward.
DEFAULT_BUCKET_BYTES = 25 * 2**20


def plan_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Group ``params`` (model order) into buckets, last parameter first.

    A bucket closes once it holds ``bucket_bytes`` or more, or when the dtype or device changes
    (one flat buffer has one of each), so a bucket exceeds ``bucket_bytes`` by at most its last
    parameter.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes!r} must be a positive integer number of "
                         f"bytes (default {DEFAULT_BUCKET_BYTES} = 25 MiB)")
    buckets: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    size = 0
    for param in reversed(params):
        if current and (size >= bucket_bytes or param.dtype != current[0].dtype
                        or param.device != current[0].device):
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
    ``shards`` (the DP group size with the distributed optimizer, else 1), so it splits into equal
    shards; the padding stays zero. ``offsets[i]`` is where ``params[i]`` starts.
    """

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    grad_data: torch.Tensor
    shards: int = 1
    param_data: torch.Tensor | None = None  # [numel], only with the distributed optimizer
    grad_shard: torch.Tensor | None = None  # [numel/shards], the reduce-scatter output
    # Per synchronisation round: parameters whose last gradient arrived, and the collective.
    ready: set[int] = field(default_factory=set)
    handle: comm.Handle | None = None

    def __post_init__(self):
        self._position_of = {id(param): i for i, param in enumerate(self.params)}

    @classmethod
    def create(cls, index: int, params: list[nn.Parameter], shards: int = 1,
               own_params: bool = False) -> "Bucket":
        """Allocate the buffers and point every ``param.grad`` (and ``param.data`` when
        ``own_params``) at its slice."""
        offsets, total = [], 0
        for param in params:
            offsets.append(total)
            total += param.numel()
        numel = -(-total // shards) * shards
        like = params[0]
        grad_data = torch.zeros(numel, dtype=like.dtype, device=like.device)
        bucket = cls(index, params, offsets, grad_data, shards)
        if own_params:
            bucket.param_data = torch.zeros_like(grad_data)
            bucket.grad_shard = grad_data.new_zeros(numel // shards)
            for param, offset in zip(params, offsets):
                view = bucket._slice(bucket.param_data, param, offset)
                view.copy_(param.detach())
                param.data = view
        for param in params:
            param.grad = bucket.grad_view(param)
        return bucket

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
