"""Plain-torch math of every native op: slow, obvious, and what the tests trust."""

from parallelkit.reference.attention import attention_block_reference
from parallelkit.reference.attention_merge import merge_attention_partials

__all__ = ["attention_block_reference", "merge_attention_partials"]
