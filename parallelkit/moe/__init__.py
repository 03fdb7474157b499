"""Mixture of experts with expert parallelism: routing, the all-to-all dispatcher, the local
experts (grouped GEMM) and ``MoELayer``."""

from parallelkit.moe.experts import ExpertParallelExperts
from parallelkit.moe.layer import MoELayer
from parallelkit.moe.router import Routing, load_balancing_loss, route, update_expert_bias

__all__ = ["ExpertParallelExperts", "MoELayer", "Routing", "route", "load_balancing_loss",
           "update_expert_bias"]
