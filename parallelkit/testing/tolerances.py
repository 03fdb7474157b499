"""Comparison tolerances derived from the dtype's epsilon, the reduction length and the magnitude.

Two correct computations of one value differ only by rounding. A sum of ``n`` terms evaluated in
another order (a ring that adds the ranks' partials in another order, another CPU's BLAS with
other blocking or FMA) rounds each addition at the magnitude of the running sum, and the ``n``
rounding errors add up like a random walk:

    |a - b|  ~  eps * sqrt(n) * scale

where ``scale`` is the magnitude of the partial sums (that of the result, or of the terms where
they cancel). A chain of such sums (a network: attention over the keys, then an MLP over the
hidden size, then weight gradients over the tokens) adds independent errors in quadrature, so
its ``n`` is the sum of the chain's reduction lengths. Hence, for a comparison of ``actual``
with ``expected``:

    rtol = SAFETY * eps * sqrt(n)        (the error relative to the element itself)
    atol = SAFETY * eps * sqrt(n) * rms(expected)    (where the element is small but its terms
                                                      were not: the tensor's scale)

``SAFETY`` = 8 covers the largest of ~1e6 elements (a Gaussian exceeds 5 sigma once in ~3e6) with
room for the output's own rounding and for both sides rounding. ``eps`` is the machine epsilon
(``torch.finfo``) of the dtype the sums run in, so the same rule serves float32, bfloat16, float16
and float64; a half-precision result adds its own rounding, a hard bound of 2 eps of its dtype.
Float64 keeps a floor of 1e-12, far below any real bug.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0
FLOAT64_FLOOR = 1e-12


def tolerance(dtype: torch.dtype, terms: int = 1, scale: float = 1.0,
              accumulate: torch.dtype | None = None) -> dict[str, float]:
    """``rtol``/``atol`` for values stored in ``dtype``, computed through sums of ``terms`` terms
    (the sum of the reduction lengths along the computation) in ``accumulate`` (default: float32
    for bfloat16/float16, whose sums every kernel here runs in float32; else ``dtype``), with
    magnitude ``scale``. Rounding to ``dtype`` (the result, one intermediate such as attention's
    probabilities on a GPU) is bounded by 2 eps; the sums' errors grow with sqrt(terms)."""
    if terms < 1:
        raise ValueError(f"terms={terms} must be >= 1 (the length of the longest reduction)")
    if accumulate is None:
        accumulate = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    rounding = 2 * torch.finfo(dtype).eps if accumulate != dtype else 0.0
    growth = rounding + SAFETY * torch.finfo(accumulate).eps * math.sqrt(terms)
    floor = FLOAT64_FLOOR if dtype == torch.float64 else 0.0
    return dict(rtol=max(growth, floor), atol=max(growth * scale, floor))


def rms(t: torch.Tensor) -> float:
    """Root-mean-square of ``t``'s finite elements, computed in float64 (1.0 for an empty tensor
    or one of zeros, so that atol never collapses to 0)."""
    finite = t.detach().double()
    finite = finite[torch.isfinite(finite)]
    value = finite.square().mean().sqrt().item() if finite.numel() else 0.0
    return value if value > 0 else 1.0


def gradient_scale(module: torch.nn.Module) -> float:
    """The rms of all of ``module``'s gradients: the scale of the terms a gradient sums, for
    gradients that cancel to ~0 (a key bias, which softmax ignores, gets pure rounding noise)."""
    grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
    return rms(torch.cat(grads)) if grads else 1.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 name: str = "", terms: int = 1, accumulate: torch.dtype | None = None,
                 scale: float | None = None) -> None:
    """``actual`` vs ``expected`` (cast to actual's dtype for the comparison), both the result of
    sums of ``terms`` terms stored in ``dtype`` (default: actual's) and summed in ``accumulate``,
    whose magnitude is ``scale`` (default: ``expected``'s rms; give the terms' own where they
    cancel)."""
    scale = max(rms(expected), scale or 0.0)
    tol = tolerance(dtype or actual.dtype, terms, scale, accumulate)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol,
                               msg=(lambda m: f"{name}: {m}") if name else None)


def transformer_terms(tokens: int, seq: int, hidden: int, ffn: int, vocab: int,
                      layers: int) -> int:
    """The summed reduction lengths of a decoder LM's loss and gradients: per layer attention
    over ``seq`` keys, projections over ``hidden``, the MLP over ``ffn``; then the head over
    ``hidden``, the loss over ``vocab`` and the weight gradients over the ``tokens``."""
    return tokens + vocab + hidden + layers * (seq + hidden + ffn)
