"""``parallelize(model, tp=..., cp=...)``: convert an existing model's layers in place.

A plan maps module-name patterns (``fnmatch``, against ``model.named_modules()`` names) to a
parallel style; each matching module is replaced by its parallel version built with
``from_dense``, which keeps this rank's shard of the existing weights, so the converted model
computes what the original did:

    colwise         nn.Linear → ColumnParallelLinear (output features split)
    colwise_gather  nn.Linear → ColumnParallelLinear(gather_output=True) (an LM head)
    rowwise         nn.Linear → RowParallelLinear(input_is_parallel=True)
    vocab           nn.Embedding → VocabParallelEmbedding
    cp_attention    a module called as attention(q, k, v, is_causal=...) → ContextParallelAttention
    conv1d_*        the same for transformers' Conv1D (GPT-2's x W + b layers, W stored [in, out]);
                    conv1d_qkv splits a fused q|k|v projection so each rank keeps its heads of all
                    three

Built-in plans: Hugging Face ``LlamaForCausalLM`` and ``GPT2LMHeadModel`` (their attention is a
registered function, so context parallelism registers ``"parallelkit_cp"`` with transformers'
attention interface) and the repo's ``TinyLM``. Other models pass ``plan={pattern: style}``.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.context_parallel import ContextParallelAttention
from parallelkit.distributed import mpu
from parallelkit.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                         VocabParallelEmbedding)

STYLES = {
    "colwise": lambda m, g: ColumnParallelLinear.from_dense(m, tp_group=g.tp_arg),
    "colwise_gather": lambda m, g: ColumnParallelLinear.from_dense(m, gather_output=True,
                                                                   tp_group=g.tp_arg),
    "rowwise": lambda m, g: RowParallelLinear.from_dense(m, input_is_parallel=True, tp_group=g.tp_arg),
    "vocab": lambda m, g: VocabParallelEmbedding.from_dense(m, tp_group=g.tp_arg),
    "cp_attention": lambda m, g: ContextParallelAttention(g.cp_arg, g.cp_layout),
    "conv1d_colwise": lambda m, g: ColumnParallelLinear.from_dense(_as_linear(m), tp_group=g.tp_arg),
    "conv1d_rowwise": lambda m, g: RowParallelLinear.from_dense(_as_linear(m), input_is_parallel=True,
                                                                tp_group=g.tp_arg),
    "conv1d_qkv": lambda m, g: ColumnParallelLinear.from_dense(
        _as_linear(m, qkv_parts=dist.get_world_size(g.tp)), tp_group=g.tp_arg),
}

LLAMA_PLAN = {
    "model.embed_tokens": "vocab",
    "model.layers.*.self_attn.[qkv]_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise_gather",
}

GPT2_PLAN = {
    "transformer.wte": "vocab",
    "transformer.h.*.attn.c_attn": "conv1d_qkv",
    "transformer.h.*.attn.c_proj": "conv1d_rowwise",
    "transformer.h.*.mlp.c_fc": "conv1d_colwise",
    "transformer.h.*.mlp.c_proj": "conv1d_rowwise",
    "lm_head": "colwise_gather",
}

TINYLM_PLAN = {
    "embed": "vocab",
    "blocks.*.[qkv]_proj": "colwise",
    "blocks.*.fc1": "colwise",
    "blocks.*.o_proj": "rowwise",
    "blocks.*.fc2": "rowwise",
    "blocks.*.core_attention": "cp_attention",
    "lm_head": "colwise_gather",
}


class _Groups:
    """The groups to convert for, and what the caller passed: None makes each layer bind to the
    MPU's group, so that it refuses to run after the MPU changes layout."""

    def __init__(self, tp_arg: dist.ProcessGroup | None, cp_arg: dist.ProcessGroup | None,
                 cp_layout: str):
        self.tp_arg, self.cp_arg, self.cp_layout = tp_arg, cp_arg, cp_layout
        self.tp = tp_arg if tp_arg is not None else mpu.get_tp_group()
        self.cp = cp_arg if cp_arg is not None else mpu.get_cp_group()


def parallelize(model: nn.Module, plan: dict[str, str] | None = None, *,
                tp_group: dist.ProcessGroup | None = None, cp_group: dist.ProcessGroup | None = None,
                cp_layout: str = "zigzag") -> nn.Module:
    """Convert ``model`` in place for the TP and CP groups (default: the MPU's) and return it.

    With cp > 1 every rank must feed its own tokens in ``cp_layout`` order
    (``split_for_context_parallel``) and, for rotary models, their global ``position_ids``
    (``context_parallel_positions``); the loss is then a mean over this rank's tokens.
    """
    groups = _Groups(tp_group, cp_group, cp_layout)
    tp, cp = dist.get_world_size(groups.tp), dist.get_world_size(groups.cp)
    kind = _model_kind(model)
    if plan is None:
        if kind is None:
            raise ValueError(f"no built-in plan for {type(model).__name__}; pass "
                             "plan={module-name pattern: style} with styles from "
                             f"{sorted(STYLES)}")
        plan = {"llama": LLAMA_PLAN, "gpt2": GPT2_PLAN, "tinylm": TINYLM_PLAN}[kind]
    unknown = sorted(set(plan.values()) - set(STYLES))
    if unknown:
        raise ValueError(f"unknown parallel style(s) {unknown}; use {sorted(STYLES)}")
    _check_heads(model, kind, tp, cp)

    used = set()
    for name, module in list(model.named_modules()):
        pattern = next((p for p in plan if fnmatch.fnmatchcase(name, p)), None)
        if pattern is None:
            continue
        used.add(pattern)
        style = plan[pattern]
        if (cp if style == "cp_attention" else tp) > 1:
            _replace(model, name, STYLES[style](module, groups))
    unused = [p for p in plan if p not in used]
    if unused:
        raise ValueError(f"plan pattern(s) {unused} matched no module of "
                         f"{type(model).__name__}; check the names in model.named_modules()")
    if kind == "tinylm":
        for block in model.blocks:
            block.heads = model.config.heads // tp
    if kind == "gpt2":
        for block in model.transformer.h:  # it splits c_attn's output into q, k, v of this size
            block.attn.split_size //= tp
            block.attn.num_heads //= tp
    if kind in ("llama", "gpt2") and cp > 1:
        _use_context_parallel_attention(model, groups)
    _tie_weights(model)
    return model


def _model_kind(model: nn.Module) -> str | None:
    from parallelkit.testing.tiny_models import TinyLM

    if isinstance(model, TinyLM):
        return "tinylm"
    return {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}.get(type(model).__name__)


def _check_heads(model: nn.Module, kind: str | None, tp: int, cp: int) -> None:
    if kind == "llama":
        heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    elif kind == "gpt2":
        heads = kv_heads = model.config.n_head
    elif kind == "tinylm":
        heads = kv_heads = model.config.heads
    else:
        return
    for what, n in (("attention heads", heads), ("key/value heads", kv_heads)):
        if n % tp:
            raise ValueError(f"{type(model).__name__} has {n} {what}, not divisible by tp={tp}: "
                             "tensor parallelism gives each rank whole heads; choose a tp that "
                             f"divides {n}")


def _as_linear(conv1d: nn.Module, qkv_parts: int | None = None) -> nn.Linear:
    """transformers' Conv1D (y = x W + b, W [in, out]) as the nn.Linear computing the same.

    With ``qkv_parts`` (the tp size) the output features of a fused [q | k | v] projection are
    reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so that a column split hands every rank the
    same heads of q, k and v."""
    weight, bias = conv1d.weight.detach().t(), conv1d.bias.detach()
    if qkv_parts is not None:
        def interleave(t):
            pieces = [part.chunk(qkv_parts, 0) for part in t.chunk(3, 0)]  # [q|k|v][rank]
            return torch.cat([pieces[i][r] for r in range(qkv_parts) for i in range(3)], 0)

        weight, bias = interleave(weight), interleave(bias)
    # skip_init: a temporary must not draw from (and so shift) the caller's RNG stream.
    linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], dtype=weight.dtype,
                                device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _tie_weights(model: nn.Module) -> None:
    """Models that tie their LM head to the embedding share one shard after conversion (both
    split the vocabulary rows the same way)."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if isinstance(head, ColumnParallelLinear) and isinstance(embed, VocabParallelEmbedding):
            head.weight = embed.weight


def _use_context_parallel_attention(model: nn.Module, groups: _Groups) -> None:
    """Route transformers' attention call of ``model`` to a ContextParallelAttention."""
    from transformers import AttentionInterface

    attention = ContextParallelAttention(groups.cp_arg, groups.cp_layout)

    def context_parallel_attention(module, query, key, value, attention_mask, dropout=0.0,
                                   scaling=None, **kwargs):
        if dropout:
            raise ValueError("context-parallel attention does not apply attention dropout; "
                             "set attention_dropout=0")
        # Causal self-attention over the whole (split) sequence; a padding mask cannot be
        # split along with the tokens, so none is applied.
        out = attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("parallelkit_cp", context_parallel_attention)
    model.config._attn_implementation = "parallelkit_cp"


def shard_batch(ids: torch.Tensor, cp_group: dist.ProcessGroup, dim: int,
                layout: str = "zigzag") -> torch.Tensor:
    """This CP rank's tokens of ``ids`` along the sequence ``dim`` (a convenience for callers)."""
    from parallelkit.context_parallel import split_for_context_parallel

    return split_for_context_parallel(ids, dist.get_rank(cp_group), dist.get_world_size(cp_group),
                                      dim=dim, layout=layout)
