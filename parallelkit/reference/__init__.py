"""Plain-torch math of every native op: slow, obvious, and what the tests trust."""

from parallelkit.reference.attention import attention_block_reference
from parallelkit.reference.attention_merge import merge_attention_partials
from parallelkit.reference.cross_entropy import cross_entropy_reference
from parallelkit.reference.norms import layer_norm, rms_norm

__all__ = ["attention_block_reference", "merge_attention_partials", "layer_norm", "rms_norm",
           "cross_entropy_reference"]
