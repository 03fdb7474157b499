"""Plain-torch math of every native op: slow, obvious, and what the tests trust."""

from parallelkit.reference.attention_merge import merge_attention_partials

__all__ = ["merge_attention_partials"]
