"""The loss for a column-parallel LM head: cross-entropy without gathering the logits.

    head = ColumnParallelLinear(h, vocab, bias=False)          # [s, b, h] -> [s, b, vocab/tp]
    loss = VocabParallelCrossEntropy(label_smoothing=0.1)(head(x), targets)   # targets [s, b]

Each rank keeps its ``[s, b, vocab/tp]`` logits; only a few numbers per token cross ranks (see
parallelkit.ops.cross_entropy for the algorithm).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.ops.cross_entropy import validate_options, vocab_parallel_cross_entropy
from parallelkit.distributed.groups import bind_group


class VocabParallelCrossEntropy(nn.Module):
    """``nn.CrossEntropyLoss`` over logits whose vocabulary is split across TP ranks.

    Shapes:
        logits: ``[..., V/tp]``, e.g. ``[s, b, V/tp]`` (class dim last): TP rank r holds vocabulary
            columns ``[r·V/tp, (r+1)·V/tp)``, as ``ColumnParallelLinear`` produces them.
        targets: ``[...]``, e.g. ``[s, b]``, integer ids in ``[0, V)`` or ``ignore_index``; the
            same on every TP rank.
        out: scalar ('mean', 'sum') or ``[...]`` ('none'); float32 (float64 for float64 logits),
            the same on every TP rank.

    Group: ``tp_group``, else the MPU's TP group (resolved at construction, checked at each call
    to still be the MPU's).

    Args:
        label_smoothing: ε in [0, 1), as in ``F.cross_entropy``.
        ignore_index: target id whose rows add nothing to the loss or to the 'mean' count.
        reduction: 'mean' | 'sum' | 'none'.
        inplace_backward: write the gradient over the logits' memory (saves one
            ``[..., V/tp]`` tensor; only when nothing else reads the logits after the loss).
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "mean", inplace_backward: bool = False, *,
                 tp_group: dist.ProcessGroup | None = None):
        super().__init__()
        validate_options(label_smoothing, reduction)
        self._group = bind_group(tp_group, "tp")
        self.tp_group = self._group.group
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index
        self.reduction, self.inplace_backward = reduction, inplace_backward

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._group.check(self)
        return vocab_parallel_cross_entropy(
            logits, targets, self.tp_group, label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index, reduction=self.reduction,
            inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"tp={dist.get_world_size(self.tp_group)}, label_smoothing={self.label_smoothing},"
                f" ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"inplace_backward={self.inplace_backward}")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None = None, *,
                   shift_labels: torch.Tensor | None = None, ignore_index: int = -100,
                   label_smoothing: float = 0.0, num_items_in_batch=None,
                   tp_group: dist.ProcessGroup | None = None, **unused) -> torch.Tensor:
    """Next-token loss on vocab-sharded logits, as transformers' ``ForCausalLMLoss`` computes it
    on full ones (the function ``parallelize(loss_parallel=True)`` installs; also for custom
    loops).

    logits ``[b, s, V/tp]`` (this rank's vocabulary slice); labels ``[b, s]`` (shifted here:
    position t predicts labels[t + 1]) or ``shift_labels`` ``[b, s]`` already shifted (needed
    under context parallelism, where a rank's next token may live on another rank). The mean is
    over the non-ignored tokens, or the sum over ``num_items_in_batch`` when given.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels [b, s] or shift_labels [b, s]")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    group = bind_group(tp_group, "tp").group
    per_token = vocab_parallel_cross_entropy(
        logits, shift_labels.to(logits.device), group, label_smoothing=label_smoothing,
        ignore_index=ignore_index, reduction="none")
    if num_items_in_batch is not None:
        return per_token.sum() / num_items_in_batch
    return per_token.sum() / (shift_labels != ignore_index).sum().clamp(min=1)
