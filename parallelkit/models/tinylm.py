"""TinyLM: the repo's tiny sequence-first GPT ([s, b, h]) for parity tests and demos, and its
family plan. Its own core attention module (context parallelism replaces it); heads counted in
each block. ``TinyLM`` is plain PyTorch; ``parallelize`` converts it with :func:`plan`, so both
compute the same function and the TP model's gradients are shards of the dense ones.

Dropout (off by default) follows Megatron: ``attention_dropout`` on the attention probabilities,
``dropout`` on the attention and MLP outputs before each residual add. A tensor sharded across
TP ranks draws its mask from the tracker's per-rank stream (``model_parallel_seed``): the heads
always, the residual branch under sequence parallelism (each rank holds its own tokens); the
residual branch without it is whole on every TP rank and draws from the default stream, which
is seeded alike on all of them, so the replicas keep one mask.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallelkit.models import Family
from parallelkit.parallel_styles import (ColwiseParallel, ContextParallel, LMHead,
                                         RowwiseParallel, SequenceParallelEntry,
                                         SequenceParallelNorm, VocabParallel)
from parallelkit.tensor_parallel.random import get_rng_tracker


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 64
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    layers: int = 2
    dropout: float = 0.0            # on the attention and MLP outputs
    attention_dropout: float = 0.0  # on the attention probabilities


class CoreAttention(nn.Module):
    """Causal softmax attention of ``[b, heads, s, d]`` tensors: the piece context parallelism
    swaps for ``ContextParallelAttention``, which takes the same call (and has no dropout)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, is_causal: bool = True):
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=p)


class Block(nn.Module):
    """Pre-norm attention + MLP. Inputs and outputs are ``[s, b, h]`` (``[s/tp, b, h]`` under
    sequence parallelism); ``heads`` counts the heads this rank computes. ``heads_sharded`` and
    ``sequence_parallel`` (set by the conversion) say which dropouts draw from the TP stream."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        h = config.hidden
        self.heads = config.heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, config.ffn), nn.Linear(config.ffn, h)
        self.core_attention = CoreAttention(config.attention_dropout)
        self.dropout, self.attention_dropout = config.dropout, config.attention_dropout
        self.heads_sharded = self.sequence_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._dropout(self.o_proj(self._attention(self.ln1(x))))
        return x + self._dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout):  # draws nothing, needs no tracker
            return x
        with _tp_stream(self.sequence_parallel):
            return F.dropout(x, self.dropout)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        def heads(t):  # [s, b, heads * d] -> [b, heads, s, d]
            s, b, _ = t.shape
            return t.view(s, b, self.heads, -1).permute(1, 2, 0, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        drops = self.training and self.attention_dropout > 0
        if drops and not isinstance(self.core_attention, CoreAttention):
            raise ValueError(f"TinyConfig(attention_dropout={self.attention_dropout}) is applied "
                             f"by CoreAttention, which {type(self.core_attention).__name__} "
                             "replaced (context parallelism has no attention dropout): use "
                             "attention_dropout=0 with cp > 1, or eval()")
        with _tp_stream(drops and self.heads_sharded):
            o = self.core_attention(q, k, v, is_causal=True)  # [b, heads, s, d]
        return o.permute(2, 0, 1, 3).flatten(2)


def _tp_stream(sharded: bool):
    """The tracker's per-TP-rank stream for a tensor sharded across TP ranks, else the default."""
    return get_rng_tracker().fork() if sharded else contextlib.nullcontext()


class TinyLM(nn.Module):
    """ids ``[s, b]`` → logits ``[s, b, vocab]``."""

    def __init__(self, config: TinyConfig = TinyConfig()):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# The family: how parallelize converts it.
def plan(model: nn.Module) -> dict:
    return {
        "embed": VocabParallel(),
        "blocks.0": SequenceParallelEntry(),
        "blocks.*.ln[12]": SequenceParallelNorm(),
        "blocks.*.[qkv]_proj": ColwiseParallel(),
        "blocks.*.fc1": ColwiseParallel(),
        "blocks.*.o_proj": RowwiseParallel(),
        "blocks.*.fc2": RowwiseParallel(),
        "blocks.*.core_attention": ContextParallel(),
        "ln_f": SequenceParallelNorm(),
        "lm_head": LMHead(),
    }


def heads(model: nn.Module) -> tuple[int, int]:
    return model.config.heads, model.config.heads


def after_conversion(model: nn.Module, conversion) -> None:
    for block in model.blocks:
        block.heads = model.config.heads // conversion.tp
        block.heads_sharded, block.sequence_parallel = True, conversion.sequence_parallel


FAMILIES = [Family("tinylm", ("TinyLM",), plan, heads, after_conversion, sequence_dim=0,
                   attention_interface=False)]
