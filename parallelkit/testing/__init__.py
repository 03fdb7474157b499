"""Test helpers: the multi-rank harness (and, as later layers land, tolerances and tiny models)."""

from parallelkit.testing.harness import close_worlds, run_on_ranks

__all__ = ["run_on_ranks", "close_worlds"]
