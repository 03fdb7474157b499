"""Ops: each native (C++/CUDA) or Triton kernel behind one function or autograd Function,
with shapes in the docstring."""

from parallelkit.ops.attention_block import attention_block_backward, attention_block_forward
from parallelkit.ops.attention_merge import merge_attention_partials_
from parallelkit.ops.cross_entropy import (VocabParallelCrossEntropyFunction,
                                          vocab_parallel_cross_entropy)
from parallelkit.ops.norms import ParallelNormFunction, parallel_layer_norm, parallel_rms_norm

__all__ = ["attention_block_forward", "attention_block_backward", "merge_attention_partials_",
           "ParallelNormFunction", "parallel_layer_norm", "parallel_rms_norm",
           "VocabParallelCrossEntropyFunction", "vocab_parallel_cross_entropy"]
