"""Context parallelism for transformers models through their attention interface.

``use_context_parallel_attention(model, cp_group, layout)`` registers ring attention over the CP
group with ``transformers.AttentionInterface`` and points every config in the model at it, so
every attention layer of every family that uses the interface runs it. Each call registers a new
name (``"parallelkit_cp_<n>"``): the registry is global, and a model converted later for another
CP group must not redirect this one. Custom models call the same helper, or put
:class:`ContextParallelAttention` where they call attention.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.context_parallel.attention import ContextParallelAttention

IMPLEMENTATION = "parallelkit_cp"  # the prefix of every registered name
_registered = itertools.count()

# Arguments transformers' attention layers pass that change the result and that ring attention
# does not implement: a value other than None is refused, never ignored. name -> what it is.
UNSUPPORTED = {
    "softcap": "attention logit soft-capping (e.g. Gemma-2's attn_logit_softcapping)",
    "s_aux": "attention sinks (e.g. GPT-OSS)",
    "position_bias": "an additive attention bias (relative positions)",
    "cache": "a paged KV cache (continuous batching)",
}

# The config fields that turn those on, checked when the model is converted.
CONFIG_UNSUPPORTED = {"attn_logit_softcapping": UNSUPPORTED["softcap"]}


def use_context_parallel_attention(model: nn.Module, cp_group: dist.ProcessGroup | None = None,
                                   layout: str = "zigzag") -> None:
    """Route ``model``'s attention to ring attention over ``cp_group`` (default: the MPU's).

    Causal self-attention over the whole (split) sequence, or within each document of a packed
    one: the forward then takes ``cu_seq_lens_q`` (transformers' flash-attention keyword), the
    boundaries of the whole packed sequence, and position ids within each document
    (``split_packed_batch`` makes both). ``position_ids`` are checked against the split. A
    padding mask cannot be split with the tokens, so a forward given an ``attention_mask`` with
    padding raises, as does an attention call with an option ring attention does not implement
    (:data:`UNSUPPORTED`, non-causal, or a sliding window shorter than the whole sequence)."""
    from transformers import AttentionInterface

    for config in _configs(model):  # known from the config: refused now, not at the first call
        for field, what in CONFIG_UNSUPPORTED.items():
            if getattr(config, field, None) is not None:
                raise ValueError(f"{type(model).__name__} uses {what} ({field}="
                                 f"{getattr(config, field)}), which context-parallel (ring) "
                                 "attention does not implement; use cp=1 for it")
    attention = ContextParallelAttention(cp_group, layout)
    cp = dist.get_world_size(attention.cp_group)

    def context_parallel_attention(module, query, key, value, attention_mask, dropout=0.0,
                                   scaling=None, **kwargs):
        if dropout:
            raise ValueError("context-parallel attention does not apply attention dropout; "
                             "set the config's attention_dropout to 0")
        _check_supported(module, key.shape[-2] * cp, kwargs)
        out = attention(query, key, value, is_causal=True, scale=scaling,
                        cu_seqlens=_document_boundaries(module, kwargs),
                        position_ids=kwargs.get("position_ids"))
        return out.transpose(1, 2).contiguous(), None

    name = f"{IMPLEMENTATION}_{next(_registered)}"
    AttentionInterface.register(name, context_parallel_attention)
    # An attention layer reads the implementation from its own config, which need not be the
    # model's: a family may give its attention modules a config copy with the local head counts.
    for config in _configs(model):
        config._attn_implementation = name
    model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)


def _configs(model: nn.Module) -> list:
    """Every distinct config object held by ``model`` or one of its modules."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    return list(configs.values())


def _check_supported(module: nn.Module, sequence: int, kwargs: dict) -> None:
    """Raise for an attention call whose result ring attention would not reproduce.

    ``sequence``: the whole sequence's length (every CP rank holds an equal share)."""
    name = type(module).__name__
    for arg, what in UNSUPPORTED.items():
        if kwargs.get(arg) is not None:
            raise ValueError(f"{name} passes {arg}= ({what}) to its attention, which context-"
                             "parallel (ring) attention does not implement; use cp=1 for it")
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise ValueError(f"{name} is not causal; context-parallel (ring) attention here is causal "
                         "self-attention only: use cp=1 for it")
    # Query t sees keys (t - window, t]: a window of at least the whole sequence masks nothing.
    window = kwargs.get("sliding_window")
    if window is not None and window < sequence:
        raise ValueError(f"{name} uses a sliding window of {window} tokens, shorter than the "
                         f"sequence ({sequence} tokens over all CP ranks), and context-parallel "
                         "(ring) attention does not implement the window: use sequences of at "
                         f"most {window} tokens, or cp=1")


def _document_boundaries(module: nn.Module, kwargs: dict):
    """The packed sequence's cu_seqlens from transformers' flash-attention keywords, or None."""
    q_bounds, k_bounds = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if k_bounds is not None and (q_bounds is None or not torch.equal(
            torch.as_tensor(q_bounds).cpu(), torch.as_tensor(k_bounds).cpu())):
        raise ValueError(f"{type(module).__name__} got cu_seq_lens_k different from "
                         "cu_seq_lens_q; context-parallel attention is self-attention over one "
                         "packed sequence: pass the same boundaries (or cu_seq_lens_q alone)")
    return q_bounds


def _refuse_padding(model, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("an attention_mask with padding cannot be honoured under context "
                         "parallelism (ring attention here is causal over the whole split "
                         "sequence): pack the sequences without padding, or pass no mask")
