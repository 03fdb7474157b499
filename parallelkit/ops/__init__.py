"""Ops: each native (C++/CUDA) or Triton kernel behind one function or autograd Function,
with shapes in the docstring."""

from parallelkit.ops.attention_block import attention_block_backward, attention_block_forward
from parallelkit.ops.attention_merge import merge_attention_partials_

__all__ = ["attention_block_forward", "attention_block_backward", "merge_attention_partials_"]
