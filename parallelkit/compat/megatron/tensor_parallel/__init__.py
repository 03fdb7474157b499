"""Megatron-core's ``tensor_parallel`` names on parallelkit: the layers (``layers.py``), the
autograd region functions (``mappings.py``), the RNG tracker and ``checkpoint`` (``random.py``)
and the vocab-parallel loss (``cross_entropy.py``). Each file says where it differs from
Megatron-core."""

from parallelkit.compat.megatron.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from parallelkit.compat.megatron.tensor_parallel.layers import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
    param_is_not_tensor_parallel_duplicate)
from parallelkit.compat.megatron.tensor_parallel.mappings import (
    all_gather_last_dim_from_tensor_parallel_region, all_to_all,
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    reduce_scatter_last_dim_to_tensor_parallel_region, reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region, scatter_to_tensor_model_parallel_region)
from parallelkit.compat.megatron.tensor_parallel.random import (
    checkpoint, get_cuda_rng_tracker, get_data_parallel_rng_tracker_name,
    get_expert_parallel_rng_tracker_name, model_parallel_cuda_manual_seed)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "param_is_not_tensor_parallel_duplicate", "vocab_parallel_cross_entropy",
    "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "all_gather_last_dim_from_tensor_parallel_region",
    "reduce_scatter_last_dim_to_tensor_parallel_region", "all_to_all",
    "checkpoint", "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed",
    "get_data_parallel_rng_tracker_name", "get_expert_parallel_rng_tracker_name",
]
