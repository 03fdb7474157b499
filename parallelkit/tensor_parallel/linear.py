"""Column- and row-parallel linear layers (Megatron's split of a transformer's matmuls).

A column-parallel layer ``Y = X A + b`` splits A's output features across TP ranks, so each rank
computes ``Y[..., n/tp]`` from the whole input. A row-parallel layer splits A's input features, so
each rank multiplies its slice of the input and the partial products are summed. Chained
column → row (attention qkv → out, MLP up → down) needs no communication in between.

Under sequence parallelism activations outside these pairs are ``[s/tp, b, h]`` (sequence-first):
the column layer all-gathers the sequence on entry and the row layer reduce-scatters it on exit,
which moves the same bytes as the all-reduce it replaces while storing 1/tp of the activations.
Batch-first models (Hugging Face, ``[b, s/tp, h]``) pass ``sequence_dim=1`` (any non-last dim
of the activations, negative counting from the end; it is used only with sequence parallelism).

Fresh layers initialise the full weight exactly as ``nn.Linear`` would from the current CPU RNG
and keep their shard, so one seed gives one model whatever tp is; ``from_dense`` keeps the shard
of an existing ``nn.Linear`` (``skip_init=True`` leaves the parameters for the caller to fill).

``overlap_comm=True`` (sequence parallelism only) runs the fused ring ops of
``parallelkit.ops.overlap`` instead of collective-then-matmul; the results are the same (with
``sequence_dim != 0`` at the cost of one copy of the input, see ``_sequence_first``). Each
layer counts the calls of each path in ``calls_by_path`` and logs the path it takes at DEBUG
level the first time, so a fused path cannot fall back unnoticed.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallelkit.distributed import comm, mappings
from parallelkit.distributed.groups import bind_group
from parallelkit.ops import overlap
from parallelkit.tensor_parallel.sequence_parallel import mark_sequence_parallel
from parallelkit.tensor_parallel.sharding import (check_input, check_positive_int, copy_shard_,
                                                  divide, new_parameter)

logger = logging.getLogger(__name__)


class _ParallelLinear(nn.Module):
    """What both layers share: shapes, sharded parameters and their initialisation."""

    weight_shard_dim: int  # of the [out, in] weight
    bias_shard_dim: int | None

    def __init__(self, in_features: int, out_features: int, bias: bool, sequence_parallel: bool,
                 overlap_comm: bool, chunks_per_rank: int, tp_group: dist.ProcessGroup | None,
                 init_method: Callable | None, device=None, dtype=None, skip_init: bool = False,
                 *, sequence_dim: int = 0):
        super().__init__()
        name = type(self).__name__
        mappings.check_sequence_dim(name, sequence_dim)
        if overlap_comm and not sequence_parallel:
            raise ValueError(f"{name}(overlap_comm=True) fuses the sequence-parallel collective "
                             "into the matmul: it needs sequence_parallel=True")
        check_positive_int(name, "in_features", in_features)
        check_positive_int(name, "out_features", out_features)
        check_positive_int(name, "chunks_per_rank", chunks_per_rank)
        self._group = bind_group(tp_group, "tp")
        self.tp_group, self.tp = self._group.group, self._group.size
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        self.overlap_comm, self.chunks_per_rank = overlap_comm, chunks_per_rank
        self.calls_by_path: Counter = Counter()
        self.init_method = init_method
        split = out_features if self.weight_shard_dim == 0 else in_features
        what = f"{name} {'out' if self.weight_shard_dim == 0 else 'in'}_features"
        local = divide(split, self.tp, what)
        shape = [out_features, in_features]
        shape[self.weight_shard_dim] = local
        self.weight = new_parameter(tuple(shape), dtype, device, self.weight_shard_dim)
        self.bias = None
        if bias:
            bias_len = local if self.bias_shard_dim == 0 else out_features
            self.bias = new_parameter((bias_len,), dtype, device, self.bias_shard_dim)
        if not skip_init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the full weight as ``nn.Linear`` does (CPU RNG, same on all TP ranks),
        apply ``init_method`` to it if given, and keep this rank's shard."""
        master = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.weight.dtype)
        if self.init_method is not None:
            self.init_method(master.weight)
        self._load_dense(master)

    def _load_dense(self, linear: nn.Linear) -> None:
        copy_shard_(self.weight, linear.weight.detach(), self.weight_shard_dim, self.tp_group)
        if self.bias is not None:
            copy_shard_(self.bias, linear.bias.detach(), self.bias_shard_dim, self.tp_group)

    @classmethod
    def _from_dense(cls, linear: nn.Linear, **kwargs):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got "
                            f"{type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, skip_init=True,
                    **kwargs)
        layer._load_dense(linear)
        return layer

    def _check_input(self, x: torch.Tensor, features: int, hint: str,
                     split_sequence: bool = False) -> None:
        """This rank's input checks, run inside the TP ranks' agreement so that an input bad on
        one rank raises on all of them (one alone raising would leave the others in the
        collective). ``split_sequence``: the sequence must also divide by tp."""
        def local_checks():
            name = type(self).__name__
            check_input(name, x, self.weight)
            if x.dim() == 0 or x.shape[-1] != features:
                raise ValueError(f"{name} expects inputs [..., {features}] ({hint}), "
                                 f"got shape {tuple(x.shape)}")
            if self.sequence_parallel:
                dim = self._sequence_dim(x)
                if split_sequence:
                    mappings.check_sequence_divisible(name, x.shape, dim, self.tp)

        self._group.check_input(self, local_checks)

    def _sequence_dim(self, x: torch.Tensor) -> int:
        return mappings.sequence_dim_of(type(self).__name__, x.shape, self.sequence_dim)

    def _count_path(self, path: str) -> None:
        if comm.compiling():  # bookkeeping for eager runs: not part of a compiled graph
            return
        if not self.calls_by_path:
            logger.debug("%s (tp=%d) runs %s", type(self).__name__, self.tp, path)
        self.calls_by_path[path] += 1

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp={self.tp}, "
                f"sequence_parallel={self.sequence_parallel}, sequence_dim={self.sequence_dim}, "
                f"overlap_comm={self.overlap_comm}")


class ColumnParallelLinear(_ParallelLinear):
    """``y = x A^T + b`` with A's output features split across TP ranks.

    Shapes (``n = out_features``):
        x: ``[s, b, in]`` replicated, or ``[s/tp, b, in]`` with ``sequence_parallel``
           (``[b, s/tp, in]`` with ``sequence_dim=1``).
        y: ``[s, b, n/tp]``, or ``[s, b, n]`` with ``gather_output`` (``[b, s, ...]`` with
           ``sequence_dim=1``).
    Weight ``[n/tp, in]`` and bias ``[n/tp]``: this rank's rows of the full ones.
    """

    weight_shard_dim, bias_shard_dim = 0, 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, *,
                 sequence_dim: int = 0, overlap_comm: bool = False, chunks_per_rank: int = 1,
                 tp_group: dist.ProcessGroup | None = None, init_method: Callable | None = None,
                 device=None, dtype=None, skip_init: bool = False):
        self.gather_output = gather_output
        super().__init__(in_features, out_features, bias, sequence_parallel, overlap_comm,
                         chunks_per_rank, tp_group, init_method, device, dtype, skip_init,
                         sequence_dim=sequence_dim)
        self.region_call = None  # set while a sequence-parallel region runs (see region.py)

    @classmethod
    def from_dense(cls, linear: nn.Linear, gather_output: bool = False,
                   sequence_parallel: bool = False, *, sequence_dim: int = 0,
                   overlap_comm: bool = False, chunks_per_rank: int = 1,
                   tp_group: dist.ProcessGroup | None = None) -> "ColumnParallelLinear":
        """This rank's shard of ``linear``; the layer computes what ``linear`` did."""
        return cls._from_dense(linear, gather_output=gather_output,
                               sequence_parallel=sequence_parallel, sequence_dim=sequence_dim,
                               overlap_comm=overlap_comm, chunks_per_rank=chunks_per_rank,
                               tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region_call is not None:
            return self._forward_in_region(x)
        self._check_input(x, self.in_features, "the full input features")
        if self.overlap_comm:
            self._count_path("fused all_gather_matmul")
            y = _sequence_first(overlap.all_gather_matmul, x, self._sequence_dim(x),
                                self.weight, self.tp_group, self.chunks_per_rank)
            y = y if self.bias is None else y + self.bias
        else:
            if self.sequence_parallel:  # saves this rank's tokens only, gathered again later
                self._count_path("all-gather then matmul")
                y = _sequence_first(_gather_then_matmul, x, self._sequence_dim(x), self.weight,
                                    self.tp_group)
                y = y if self.bias is None else y + self.bias
            else:
                self._count_path("matmul (all-reduce in backward)")
                y = F.linear(mappings.copy_to_tp_region(x, self.tp_group), self.weight, self.bias)
        return mappings.gather_from_tp_region(y, self.tp_group) if self.gather_output else y

    def _forward_in_region(self, x: torch.Tensor) -> torch.Tensor:
        """Inside a sequence-parallel region (``region.py``): ``x`` is the sequence the region
        gathered on entry, where it computed this layer's product already (and whose backward
        reduce-scatters this layer's input gradient)."""
        call = self.region_call
        if x is not call.gathered:
            raise RuntimeError(f"{type(self).__name__} belongs to a sequence-parallel region and "
                               "must be called with the region's input as the region received "
                               f"it (gathered, shape {tuple(call.gathered.shape)}), got a tensor "
                               f"of shape {tuple(x.shape)}: ParallelRegion fits a module that "
                               "passes its input straight to its column layers; for this one use "
                               "sequence_parallel=False or a plan without ParallelRegion")
        self._count_path(call.path)
        y = call.product if self.bias is None else call.product + self.bias
        return mappings.gather_from_tp_region(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """``y = x A^T + b`` with A's input features split across TP ranks.

    Shapes (``k = in_features``):
        x: ``[s, b, k/tp]`` with ``input_is_parallel`` (a column-parallel output), else
           ``[s, b, k]`` replicated (this layer takes its slice).
        y: ``[s, b, out]`` replicated, or ``[s/tp, b, out]`` with ``sequence_parallel``
           (``[b, s/tp, out]`` from ``x: [b, s, k/tp]`` with ``sequence_dim=1``).
    Weight ``[out, k/tp]``: this rank's columns. Bias ``[out]`` is replicated and added after
    the reduction; under sequence parallelism it is marked (see ``sequence_parallel.py``).
    """

    weight_shard_dim, bias_shard_dim = 1, None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = False, sequence_parallel: bool = False, *,
                 sequence_dim: int = 0, overlap_comm: bool = False, chunks_per_rank: int = 1,
                 tp_group: dist.ProcessGroup | None = None, init_method: Callable | None = None,
                 device=None, dtype=None, skip_init: bool = False):
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear(sequence_parallel=True) needs "
                             "input_is_parallel=True: its input must be a column-parallel output")
        self.input_is_parallel = input_is_parallel
        super().__init__(in_features, out_features, bias, sequence_parallel, overlap_comm,
                         chunks_per_rank, tp_group, init_method, device, dtype, skip_init,
                         sequence_dim=sequence_dim)
        if sequence_parallel and self.bias is not None:
            mark_sequence_parallel(self.bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, input_is_parallel: bool = False,
                   sequence_parallel: bool = False, *, sequence_dim: int = 0,
                   overlap_comm: bool = False, chunks_per_rank: int = 1,
                   tp_group: dist.ProcessGroup | None = None) -> "RowParallelLinear":
        """This rank's shard of ``linear``; the layer computes what ``linear`` did."""
        return cls._from_dense(linear, input_is_parallel=input_is_parallel,
                               sequence_parallel=sequence_parallel, sequence_dim=sequence_dim,
                               overlap_comm=overlap_comm, chunks_per_rank=chunks_per_rank,
                               tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_is_parallel:  # (sequence parallelism implies it)
            self._check_input(x, self.in_features // self.tp, f"this rank's 1/{self.tp} slice",
                              split_sequence=True)
        else:
            self._check_input(x, self.in_features, "the full input features")
            x = mappings.scatter_to_tp_region(x, self.tp_group)
        dim = self._sequence_dim(x) if self.sequence_parallel else None
        # The bias is added after the sum, or it would be added tp times.
        if self.overlap_comm:
            self._count_path("fused matmul_reduce_scatter")
            y = _sequence_first(overlap.matmul_reduce_scatter, x, dim, self.weight,
                                self.tp_group, self.chunks_per_rank)
        elif self.sequence_parallel:
            self._count_path("matmul then reduce-scatter")
            y = mappings.reduce_scatter_to_sp_region(F.linear(x, self.weight), self.tp_group,
                                                     dim=dim)
        else:
            self._count_path("matmul then all-reduce")
            y = mappings.reduce_from_tp_region(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


def _gather_then_matmul(x: torch.Tensor, weight: torch.Tensor,
                        group: dist.ProcessGroup) -> torch.Tensor:
    return overlap.all_gather_matmul_and_input(x, [weight], group, fused=False)[0]


def _sequence_first(fused_op: Callable, x: torch.Tensor, dim: int, *args) -> torch.Tensor:
    """``fused_op(x, *args)`` for ``x`` whose sequence is dim ``dim``: the ring ops split and gather
    the leading rows of ``x`` viewed as ``[rows, k]``, so the sequence must lead. For ``dim != 0``
    this costs one copy of ``x`` (and of the gradient in backward). The result is moved back as a
    view that stays sequence-first in memory, so when only elementwise ops (bias, activation)
    lie between this layer and the next fused one, the next one's move copies nothing."""
    if dim == 0:
        return fused_op(x, *args)
    return fused_op(x.movedim(dim, 0).contiguous(), *args).movedim(0, dim)
