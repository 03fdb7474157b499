"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE.

Attention, norms, embedding and head as the structural plan places them (sequence parallelism,
fused overlap, vocab-parallel loss); the MoE block ``mlp`` as:

    mlp.gate             the router, Replicated (each rank routes its own tokens)
    mlp.experts          ExpertParallel: E/ep experts per rank, each split over etp
    mlp.shared_expert    (Qwen2-MoE) the shared expert, Replicated: it sees the block's
    mlp.shared_expert_gate   flattened tokens [T, H], so it runs whole on this rank's tokens

Every decoder layer must hold the same kind of block (a stack mixing dense and MoE layers needs
a plan of its own).
"""

from __future__ import annotations

from torch import nn

from parallelkit.models import Family, config_heads
from parallelkit.models.decoder import decoder_layers, structural_plan
from parallelkit.parallel_styles import ExpertParallel, Replicated

REPLICATED = ("gate", "shared_expert", "shared_expert_gate")


def moe_plan(model: nn.Module) -> dict:
    stack, layers = decoder_layers(model)
    kinds = {type(layer.mlp).__name__ for layer in layers}
    if len(kinds) > 1:
        raise ValueError(f"{type(model).__name__} mixes MLP kinds {sorted(kinds)} across its "
                         "decoder layers (dense and MoE): pass parallelize(model, plan=...) "
                         "with ExpertParallel() for the MoE layers' experts")
    block = layers[0].mlp
    if not hasattr(block, "experts"):
        raise ValueError(f"{type(model).__name__}'s decoder layers have no mlp.experts")
    plan = structural_plan(model, exclude=("mlp",))
    plan[f"{stack}.*.mlp.experts"] = ExpertParallel()
    for name in REPLICATED:
        if hasattr(block, name):
            plan[f"{stack}.*.mlp.{name}"] = Replicated()
    return plan


FAMILIES = [
    Family("mixtral", ("MixtralForCausalLM", "MixtralModel"), moe_plan, config_heads),
    Family("qwen2_moe", ("Qwen2MoeForCausalLM", "Qwen2MoeModel"), moe_plan, config_heads),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM", "Qwen3MoeModel"), moe_plan, config_heads),
]
