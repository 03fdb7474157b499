"""Reference for softmax cross-entropy (parallelkit.ops.cross_entropy), written from the formula."""

from __future__ import annotations

import torch


def cross_entropy_reference(full_logits: torch.Tensor, targets: torch.Tensor,
                            label_smoothing: float = 0.0, ignore_index: int = -100,
                            reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in float64, differentiable, with the log-softmax written out by hand.

        loss_row = (1-ε)·(lse - x[target]) + ε·(lse - mean(x)),   lse = log Σ_v exp(x[v])

    Args:
        full_logits: [..., V] the whole vocabulary (class dim last).
        targets: [...] class ids in [0, V), or ``ignore_index`` (such rows give 0 and leave the
            'mean' denominator, so 'mean' over only ignored rows is 0/0 = nan, as in torch).
        reduction: 'mean', 'sum' or 'none' ([...] per-row losses).

    Returns:
        float64 loss; its gradient w.r.t. ``full_logits`` is the reference gradient.
    """
    x = full_logits.double().reshape(-1, full_logits.shape[-1])
    t = targets.reshape(-1)
    # The max only shifts exp into range; lse does not depend on it, so it carries no gradient.
    row_max = x.max(dim=1, keepdim=True).values.detach()
    lse = row_max + torch.log(torch.exp(x - row_max).sum(dim=1, keepdim=True))
    log_probs = x - lse
    kept = t != ignore_index
    nll = -log_probs.gather(1, torch.where(kept, t, 0)[:, None]).squeeze(1)
    loss = nll
    if label_smoothing:  # not 0 * smooth: a -inf logit (padding) makes smooth inf
        loss = (1 - label_smoothing) * nll + label_smoothing * -log_probs.mean(dim=1)
    loss = torch.where(kept, loss, 0.0)
    if reduction == "none":
        return loss.view(targets.shape)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / kept.sum()
    raise ValueError(f"reduction={reduction!r} must be 'mean', 'sum' or 'none'")
