"""Qwen2 (biases on q/k/v: split with their rows) and Qwen3 (per-head q/k RMSNorms over the head
dim, which act on whole local heads and stay as they are)."""

from parallelkit.models import Family, config_heads
from parallelkit.models.decoder import structural_plan

FAMILIES = [
    Family("qwen2", ("Qwen2ForCausalLM", "Qwen2Model"), structural_plan, config_heads),
    Family("qwen3", ("Qwen3ForCausalLM", "Qwen3Model"), structural_plan, config_heads),
]
