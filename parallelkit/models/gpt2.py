"""GPT-2: transformers' Conv1D layers (W stored [in, out]), a fused [q | k | v] projection whose
parts are split so each rank keeps its heads of all three, learned positions, tied head."""

from torch import nn

from parallelkit.models import Family, config_heads
from parallelkit.parallel_styles import (ColwiseParallel, LMHead, ParallelRegion,
                                         RowwiseParallel, SequenceParallelEntry,
                                         SequenceParallelExit, SequenceParallelNorm,
                                         VocabParallel)


def plan(model: nn.Module) -> dict:
    hidden = model.config.n_embd
    return {
        "transformer.wte": VocabParallel(),
        "transformer.h.0": SequenceParallelEntry(),
        "transformer.h.*.ln_[12]": SequenceParallelNorm(),
        "transformer.h.*.attn": ParallelRegion(),
        "transformer.h.*.mlp": ParallelRegion(),
        "transformer.h.*.attn.c_attn": ColwiseParallel(parts=[hidden] * 3),
        "transformer.h.*.attn.c_proj": RowwiseParallel(),
        "transformer.h.*.mlp.c_fc": ColwiseParallel(),
        "transformer.h.*.mlp.c_proj": RowwiseParallel(),
        # GPT2Model views ln_f's output as [-1, s, h], s from the input ids: gather it first.
        "transformer.ln_f": SequenceParallelExit(),
        "lm_head": LMHead(sequence_parallel=False),
    }


def after_conversion(model: nn.Module, conversion) -> None:
    for block in model.transformer.h:  # it splits c_attn's output into q, k, v of this size
        block.attn.split_size //= conversion.tp


FAMILIES = [Family("gpt2", ("GPT2LMHeadModel", "GPT2Model"), plan, config_heads,
                   after_conversion)]
