"""Phi-3: fused ``qkv_proj`` [q | k | v] and ``gate_up_proj`` [gate | up], split part by part so
each rank keeps its heads and its halves of gate and up; the attention reads its head counts
from the config at every call, so each attention module gets a copy with the local counts."""

import copy

from torch import nn

from parallelkit.models import Family, config_heads
from parallelkit.parallel_styles import (ColwiseParallel, LMHead, ParallelRegion,
                                         RowwiseParallel, SequenceParallelEntry,
                                         SequenceParallelNorm, VocabParallel)


def plan(model: nn.Module) -> dict:
    config = model.config
    heads, kv_heads = config_heads(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "model.embed_tokens": VocabParallel(),
        "model.layers.0": SequenceParallelEntry(),
        "model.layers.*.*_layernorm": SequenceParallelNorm(),
        "model.layers.*.self_attn": ParallelRegion(),
        "model.layers.*.mlp": ParallelRegion(),
        "model.layers.*.self_attn.qkv_proj": ColwiseParallel(parts=[q, kv, kv]),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_up_proj": ColwiseParallel(parts=[config.intermediate_size] * 2),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "model.norm": SequenceParallelNorm(),
        "lm_head": LMHead(),
    }


def after_conversion(model: nn.Module, conversion) -> None:
    tp = conversion.tp
    for layer in model.model.layers:
        attention = layer.self_attn
        local = copy.copy(attention.config)
        local.num_attention_heads //= tp
        local.num_key_value_heads //= tp
        attention.config = local


FAMILIES = [Family("phi3", ("Phi3ForCausalLM", "Phi3Model"), plan, config_heads, after_conversion)]
