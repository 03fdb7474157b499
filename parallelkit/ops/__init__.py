"""Native ops: one function per op in torch.ops.parallelkit, with shapes in the docstring."""

from parallelkit.ops.attention_merge import merge_attention_partials_

__all__ = ["merge_attention_partials_"]
