"""Context parallelism: the sequence split across ranks, attention computed exactly by a ring;
packed documents split one by one (``packing``)."""

from parallelkit.context_parallel.attention import ContextParallelAttention
from parallelkit.context_parallel.packing import pack_documents, split_packed_batch
from parallelkit.distributed.context_layout import (context_parallel_positions,
                                                 gather_from_context_parallel,
                                                 split_for_context_parallel)
from parallelkit.distributed.packed_layout import PackedLayout, gather_packed, split_packed

__all__ = ["ContextParallelAttention", "split_for_context_parallel",
           "gather_from_context_parallel", "context_parallel_positions", "PackedLayout",
           "split_packed", "gather_packed", "pack_documents", "split_packed_batch"]
