"""Comparison tolerances by dtype: one table, so every test means the same thing by "equal"."""

import torch

# Against a float64 reference. bf16 and fp16 cover one rounding of the result (and of the
# inputs, which the reference sees in float64); fp32 covers accumulation-order differences.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 name: str = "") -> None:
    """``actual`` vs ``expected`` (cast to actual's dtype for the comparison) with the tolerance
    of ``dtype`` (default: actual's)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol,
                               msg=(lambda m: f"{name}: {m}") if name else None)
