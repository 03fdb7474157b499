"""The repo's TinyLM (``parallelkit.testing.tiny_models``): sequence-first [s, b, h], its own
core attention module (context parallelism replaces it), heads counted in each block."""

from torch import nn

from parallelkit.models import Family
from parallelkit.parallel_styles import (ColwiseParallel, ContextParallel, LMHead,
                                         RowwiseParallel, SequenceParallelEntry,
                                         SequenceParallelNorm, VocabParallel)


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
