"""Tensor- and sequence-parallel layers: drop-in replacements for ``nn.Linear`` / ``nn.Embedding``."""

from parallelkit.tensor_parallel.cross_entropy import VocabParallelCrossEntropy, causal_lm_loss
from parallelkit.tensor_parallel.embedding import VocabParallelEmbedding
from parallelkit.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear
from parallelkit.tensor_parallel.norms import ParallelLayerNorm, ParallelRMSNorm
from parallelkit.tensor_parallel.random import (RNGStatesTracker, get_rng_tracker,
                                                model_parallel_seed)
from parallelkit.tensor_parallel.sequence_parallel import (mark_sequence_parallel,
                                                           register_sequence_parallel_grad_hooks,
                                                           sync_sequence_parallel_grads)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "ParallelLayerNorm", "ParallelRMSNorm", "VocabParallelCrossEntropy", "causal_lm_loss",
    "RNGStatesTracker", "get_rng_tracker", "model_parallel_seed",
    "mark_sequence_parallel", "sync_sequence_parallel_grads",
    "register_sequence_parallel_grad_hooks",
]
