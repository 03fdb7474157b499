"""Model families: how ``parallelize`` converts each architecture, one small file per family.

A :class:`Family` names the architectures (model class names) it converts, builds the plan for a
model, says how many query and key/value heads the model has (checked against tp), and fixes up
what the architecture stores about its own sizes after conversion (local head counts). A model of
no known family gets :func:`parallelkit.models.decoder.structural_plan`, which recognises a
standard decoder (q/k/v/o attention, gated or plain MLP, embedding, LM head) or refuses, naming
the module it cannot place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    plan: Callable[[nn.Module], dict]              # model -> {name pattern: ParallelStyle}
    heads: Callable[[nn.Module], tuple[int, int]]  # model -> (query heads, key/value heads)
    after_conversion: Callable | None = None       # (model, conversion) -> None
    sequence_dim: int = 1                          # batch-first [b, s, h]
    attention_interface: bool = True               # CP through transformers' attention registry


def family_of(model: nn.Module) -> Family | None:
    """The family whose architectures include ``model``'s class name, else None."""
    from parallelkit.models import gemma, gpt2, gpt_neox, llama, moe, phi3, qwen, tinylm

    name = type(model).__name__
    for module in (llama, qwen, gemma, phi3, gpt_neox, gpt2, tinylm, moe):
        for family in module.FAMILIES:
            if name in family.architectures:
                return family
    return None


def config_heads(model: nn.Module) -> tuple[int, int]:
    """(heads, kv_heads) from a transformers config (kv_heads defaults to heads)."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    return heads, getattr(config, "num_key_value_heads", None) or heads
