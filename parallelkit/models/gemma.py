"""Gemma: the embedding multiplies by sqrt(hidden) (kept by VocabParallel through its
``embed_scale``); RMSNorm computes (1 + w) x / rms, which is per token and stays as it is."""

from parallelkit.models import Family, config_heads
from parallelkit.models.decoder import structural_plan

FAMILIES = [Family("gemma", ("GemmaForCausalLM", "GemmaModel"), structural_plan, config_heads)]
