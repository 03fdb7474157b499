"""Context parallelism: the sequence split across ranks, attention computed exactly by a ring."""

from parallelkit.context_parallel.attention import ContextParallelAttention
from parallelkit.distributed.context_layout import (context_parallel_positions,
                                                 gather_from_context_parallel,
                                                 split_for_context_parallel)

__all__ = ["ContextParallelAttention", "split_for_context_parallel",
           "gather_from_context_parallel", "context_parallel_positions"]
