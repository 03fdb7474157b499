"""Context parallelism for transformers models through their attention interface.

``use_context_parallel_attention(model, cp_group, layout)`` registers ``"parallelkit_cp"`` with
``transformers.AttentionInterface`` and points the model's config at it, so every attention layer
of every family that uses the interface runs ring attention over the CP group. Custom models call
the same helper, or put :class:`ContextParallelAttention` where they call attention.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from parallelkit.context_parallel.attention import ContextParallelAttention

IMPLEMENTATION = "parallelkit_cp"


def use_context_parallel_attention(model: nn.Module, cp_group: dist.ProcessGroup | None = None,
                                   layout: str = "zigzag") -> None:
    """Route ``model``'s attention to ring attention over ``cp_group`` (default: the MPU's).

    Causal self-attention over the whole (split) sequence: a padding mask cannot be split with
    the tokens, so a forward given an ``attention_mask`` with padding raises."""
    from transformers import AttentionInterface

    attention = ContextParallelAttention(cp_group, layout)

    def context_parallel_attention(module, query, key, value, attention_mask, dropout=0.0,
                                   scaling=None, **kwargs):
        if dropout:
            raise ValueError("context-parallel attention does not apply attention dropout; "
                             "set the config's attention_dropout to 0")
        out = attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(IMPLEMENTATION, context_parallel_attention)
    model.config._attn_implementation = IMPLEMENTATION
    model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)


def _refuse_padding(model, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("an attention_mask with padding cannot be honoured under context "
                         "parallelism (ring attention here is causal over the whole split "
                         "sequence): pack the sequences without padding, or pass no mask")
