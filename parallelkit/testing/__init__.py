"""Test helpers: the multi-rank harness and derived tolerances (tests and benchmarks use them; the library does not)."""

from parallelkit.testing.harness import close_worlds, run_on_ranks

__all__ = ["run_on_ranks", "close_worlds"]
