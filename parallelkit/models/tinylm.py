"""TinyLM: the repo's tiny sequence-first GPT ([s, b, h]) for parity tests and demos, and its
family plan. Its own core attention module (context parallelism replaces it); heads counted in
each block. ``TinyLM`` is plain PyTorch; ``parallelize`` converts it with :func:`plan`, so both
compute the same function and the TP model's gradients are shards of the dense ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallelkit.models import Family
from parallelkit.parallel_styles import (ColwiseParallel, ContextParallel, LMHead,
                                         RowwiseParallel, SequenceParallelEntry,
                                         SequenceParallelNorm, VocabParallel)


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 64
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    layers: int = 2


class CoreAttention(nn.Module):
    """Causal softmax attention of ``[b, heads, s, d]`` tensors: the piece context parallelism
    swaps for ``ContextParallelAttention``, which takes the same call."""

    def forward(self, q, k, v, is_causal: bool = True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


class Block(nn.Module):
    """Pre-norm attention + MLP. Inputs and outputs are ``[s, b, h]`` (``[s/tp, b, h]`` under
    sequence parallelism); ``heads`` counts the heads this rank computes."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        h = config.hidden
        self.heads = config.heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, config.ffn), nn.Linear(config.ffn, h)
        self.core_attention = CoreAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o_proj(self._attention(self.ln1(x)))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        def heads(t):  # [s, b, heads * d] -> [b, heads, s, d]
            s, b, _ = t.shape
            return t.view(s, b, self.heads, -1).permute(1, 2, 0, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = self.core_attention(q, k, v, is_causal=True)  # [b, heads, s, d]
        return o.permute(2, 0, 1, 3).flatten(2)


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


FAMILIES = [Family("tinylm", ("TinyLM",), plan, heads, after_conversion, sequence_dim=0,
                   attention_interface=False)]
