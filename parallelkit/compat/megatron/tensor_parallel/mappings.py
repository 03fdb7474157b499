"""Megatron-core's autograd region functions (``tensor_parallel.mappings``) over
``parallelkit.distributed.mappings``, with Megatron's names and ``group=None`` meaning the MPU's
TP group. Sequence-parallel tensors are sequence-first, ``[s/tp, b, h]``: the sequence is dim 0.

    forward                                     backward
    copy_to_tensor_model_parallel_region        identity          all-reduce
    reduce_from_tensor_model_parallel_region    all-reduce        identity
    scatter_to_tensor_model_parallel_region     split last dim    all-gather last dim
    gather_from_tensor_model_parallel_region    all-gather last   split last dim
    scatter_to_sequence_parallel_region         split dim 0       all-gather dim 0
    gather_from_sequence_parallel_region        all-gather dim 0  reduce-scatter (or split)
    reduce_scatter_to_sequence_parallel_region  reduce-scatter 0  all-gather dim 0
    all_gather_last_dim_from_tensor_parallel_region     all-gather last   reduce-scatter last
    reduce_scatter_last_dim_to_tensor_parallel_region   reduce-scatter last   all-gather last

Uneven split sizes are refused (NotImplementedError); ``use_global_buffer`` only chose where
Megatron's result was stored, so it is accepted and the result is the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallelkit.compat.megatron import parallel_state
from parallelkit.distributed import mappings


def _tp(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else parallel_state.get_tensor_model_parallel_group()


def _even(what: str, sizes) -> None:
    if sizes is not None:
        raise NotImplementedError(f"{what}: uneven split sizes are not supported; pad each "
                                  "rank's part to the same size and pass None")


def copy_to_tensor_model_parallel_region(input_, group=None) -> torch.Tensor:
    return mappings.copy_to_tp_region(input_, _tp(group))


def reduce_from_tensor_model_parallel_region(input_, group=None) -> torch.Tensor:
    return mappings.reduce_from_tp_region(input_, _tp(group))


def scatter_to_tensor_model_parallel_region(input_, group=None) -> torch.Tensor:
    return mappings.scatter_to_tp_region(input_, _tp(group))


def gather_from_tensor_model_parallel_region(input_, group=None) -> torch.Tensor:
    return mappings.gather_from_tp_region(input_, _tp(group))


def scatter_to_sequence_parallel_region(input_, group=None) -> torch.Tensor:
    return mappings.scatter_to_sp_region(input_, _tp(group))


def gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=None,
                                         output_split_sizes=None,
                                         use_global_buffer=False) -> torch.Tensor:
    _even("gather_from_sequence_parallel_region(output_split_sizes=...)", output_split_sizes)
    return mappings.gather_from_sp_region(input_, _tp(group), tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(input_, group=None, input_split_sizes=None,
                                               use_global_buffer=False) -> torch.Tensor:
    _even("reduce_scatter_to_sequence_parallel_region(input_split_sizes=...)", input_split_sizes)
    return mappings.reduce_scatter_to_sp_region(input_, _tp(group))


# The sequence-parallel pair along the last dim instead of the first.
def all_gather_last_dim_from_tensor_parallel_region(input_, group=None) -> torch.Tensor:
    return mappings.gather_from_sp_region(input_, _tp(group), True, dim=-1)


def reduce_scatter_last_dim_to_tensor_parallel_region(input_, group=None) -> torch.Tensor:
    return mappings.reduce_scatter_to_sp_region(input_, _tp(group), dim=-1)


def all_to_all(group, input_, output_split_sizes_=None, input_split_sizes=None) -> torch.Tensor:
    """Megatron's ``all_to_all``: equal chunks of dim 0 exchanged over ``group`` (required)."""
    if group is None:
        raise ValueError("all_to_all needs a group, as in Megatron (e.g. the expert model "
                         "parallel group)")
    _even("all_to_all(output_split_sizes_=..., input_split_sizes=...)",
          output_split_sizes_ if input_split_sizes is None else input_split_sizes)
    return mappings.all_to_all(input_, 0, 0, group)
