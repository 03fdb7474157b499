"""Llama and Mistral: q/k/v/o attention (GQA), gated MLP, RMSNorm, untied or tied head."""

from parallelkit.models import Family, config_heads
from parallelkit.models.decoder import structural_plan

FAMILIES = [
    Family("llama", ("LlamaForCausalLM", "LlamaModel"), structural_plan, config_heads),
    Family("mistral", ("MistralForCausalLM", "MistralModel"), structural_plan, config_heads),
]
