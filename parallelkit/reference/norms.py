"""Reference LayerNorm and RMSNorm over the full hidden dim (see parallelkit.ops.norms).

Both compute in float64 whatever the input dtype and return float64, so a test compares an op's
output (and, through autograd, its gradients) against the exact math of the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _residual_sum(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x.double() if residual is None else x.double() + residual.double()


def _double(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5,
               residual: torch.Tensor | None = None):
    """``F.layer_norm`` of ``s = x + residual`` over the last dim, in float64.

    Args:
        x, residual: ``[..., H]``; weight, bias: ``[H]`` or None.
    Returns:
        y ``[..., H]``, or ``(y, s)`` when residual is given (s: the new residual stream).
    """
    s = _residual_sum(x, residual)
    y = F.layer_norm(s, s.shape[-1:], _double(weight), _double(bias), eps)
    return y if residual is None else (y, s)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = 1e-6,
             residual: torch.Tensor | None = None):
    """``s / sqrt(mean(s^2) + eps) * weight`` over the last dim, ``s = x + residual``, in float64.

    ``eps=None`` means ``torch.finfo(float32).eps`` for float16/bfloat16/float32 inputs and
    ``torch.finfo(float64).eps`` for float64, as ``torch.nn.functional.rms_norm`` does.
    Returns y, or ``(y, s)`` when residual is given.
    """
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    s = _residual_sum(x, residual)
    y = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    return y if residual is None else (y, s)
