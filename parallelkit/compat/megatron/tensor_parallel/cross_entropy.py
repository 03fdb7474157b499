"""Megatron-core's ``vocab_parallel_cross_entropy`` over ``parallelkit.ops.cross_entropy``."""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallelkit.compat.megatron import parallel_state
from parallelkit.ops import cross_entropy


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0,
                                 tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token cross-entropy from this rank's vocabulary slice of the logits (Megatron's call).

    Args:
        vocab_parallel_logits: ``[s, b, V/tp]``, TP rank r's columns ``[r·V/tp, (r+1)·V/tp)``.
        target: ``[s, b]`` ids in ``[0, V)``, the same on every TP rank.
        label_smoothing: ε in [0, 1).
        tp_group: default the MPU's TP group.

    Returns:
        loss ``[s, b]``, float32 (float64 for float64 logits), the same on every TP rank.

    Differences from Megatron-core, on purpose:
        - Label smoothing is ``F.cross_entropy(full_logits, target, label_smoothing=ε)``'s, over
          the whole vocabulary: (1 - ε)·nll + ε·mean over all V classes of -log p. Megatron's
          uses ε' = ε·V_local/(V_local - 1) and the mean over this rank's V_local = V/tp classes
          only, so its smoothed loss changes with tp (at tp=1 Megatron's loss for ε is this one
          for ε' = ε·V/(V - 1)). The unsmoothed loss is the same.
        - A target of -100 adds 0 (parallelkit's ignore_index; Megatron has none); any other id
          outside [0, V) raises instead of counting as a logit of 0.
        - The logits are not overwritten (Megatron's subtracts the max from float32 logits in
          place).
    """
    group = tp_group if tp_group is not None else \
        parallel_state.get_tensor_model_parallel_group()
    return cross_entropy.vocab_parallel_cross_entropy(
        vocab_parallel_logits, target, group, label_smoothing=label_smoothing, reduction="none")
