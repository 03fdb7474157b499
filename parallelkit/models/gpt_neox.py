"""GPT-NeoX (Pythia): the fused ``query_key_value`` is laid out per head ([head: q k v]), so a
contiguous column split already hands each rank whole heads; parallel residual needs nothing."""

from torch import nn

from parallelkit.models import Family, config_heads
from parallelkit.parallel_styles import (ColwiseParallel, LMHead, ParallelRegion,
                                         RowwiseParallel, SequenceParallelEntry,
                                         SequenceParallelNorm, VocabParallel)


def plan(model: nn.Module) -> dict:
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    return {
        "gpt_neox.embed_in": VocabParallel(),
        "gpt_neox.layers.0": SequenceParallelEntry(),
        "gpt_neox.layers.*.*_layernorm": SequenceParallelNorm(),
        "gpt_neox.layers.*.attention": ParallelRegion(),
        "gpt_neox.layers.*.mlp": ParallelRegion(),
        "gpt_neox.layers.*.attention.query_key_value": ColwiseParallel(),
        "gpt_neox.layers.*.attention.dense": RowwiseParallel(),
        "gpt_neox.layers.*.mlp.dense_h_to_4h": ColwiseParallel(),
        "gpt_neox.layers.*.mlp.dense_4h_to_h": RowwiseParallel(),
        "gpt_neox.final_layer_norm": SequenceParallelNorm(),
        head: LMHead(),  # embed_out in older transformers, lm_head in newer
    }


FAMILIES = [Family("gpt_neox", ("GPTNeoXForCausalLM", "GPTNeoXModel"), plan, config_heads)]
