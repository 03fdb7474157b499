"""Random streams for dropout under tensor parallelism (Megatron's RNG tracker).

Dropout on a tensor that is replicated across TP ranks (outside TP regions) must draw the same
mask on every TP rank, or the replicas drift apart; dropout on a sharded tensor (attention heads,
an MLP's hidden slice, a sequence-parallel shard) must draw different masks per TP rank, or the
shards repeat one pattern. So the default generator is seeded identically on all TP ranks, and a
second, per-TP-rank stream is swapped in for the sharded regions:

    model_parallel_seed(1234)            # default stream: seed; TP stream: seed + 2718 + tp_rank
    x = F.dropout(x, 0.1)                # same mask on every TP rank
    with get_rng_tracker().fork():
        h = F.dropout(h_shard, 0.1)      # a different mask on each TP rank

``get_states()``/``set_states()`` save and restore the streams with a checkpoint. Works on the
CPU generator or the current CUDA device's, chosen when the tracker is made.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Megatron's offset, kept so that a seed gives the same streams in both frameworks.
TP_SEED_OFFSET = 2718


class RNGStatesTracker:
    """Named generator states, swapped into the default generator of ``device_type`` on fork."""

    def __init__(self, device_type: str = "cpu"):
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type={device_type!r} must be 'cpu' or 'cuda'")
        self.device_type = device_type
        self._states: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self._states = {}

    def add(self, name: str, seed: int) -> None:
        """A new stream ``name`` starting from ``seed`` (the current stream is left as it was)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists; reset() the tracker first")
        outer = self._get()
        self._manual_seed(seed)
        self._states[name] = self._get()
        self._set(outer)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every stream's state, for a checkpoint."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the outer stream resumes untouched."""
        if name not in self._states:
            raise ValueError(f"no RNG stream named {name!r} (known: {sorted(self._states)}); "
                             "call parallelkit.tensor_parallel.model_parallel_seed(seed) first")
        outer = self._get()
        self._set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get()
            self._set(outer)

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state() if self.device_type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device_type == "cuda":
            torch.cuda.set_rng_state(state)
        else:
            torch.set_rng_state(state)

    def _manual_seed(self, seed: int) -> None:
        if self.device_type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)


_tracker: RNGStatesTracker | None = None


def get_rng_tracker() -> RNGStatesTracker:
    """This process's tracker (made by :func:`model_parallel_seed`)."""
    if _tracker is None:
        raise ValueError("the model-parallel RNG tracker is not set up: call "
                         "parallelkit.tensor_parallel.model_parallel_seed(seed) first")
    return _tracker


def model_parallel_seed(seed: int, tp_group: dist.ProcessGroup | None = None,
                        device_type: str | None = None) -> RNGStatesTracker:
    """Seed the default stream with ``seed`` (equal on all ranks) and the TP stream with
    ``seed + 2718 + tp_rank``. ``device_type`` defaults to "cuda" when available, else "cpu"."""
    global _tracker
    from parallelkit.distributed.groups import resolve_group

    tp_rank = dist.get_rank(resolve_group(tp_group, "tp"))
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)  # seeds the CPU generator and every CUDA device's
    _tracker = RNGStatesTracker(device_type)
    _tracker.add(MODEL_PARALLEL_RNG, seed + TP_SEED_OFFSET + tp_rank)
    return _tracker
