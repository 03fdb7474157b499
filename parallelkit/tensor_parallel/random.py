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

Activation recomputation replays a forward in backward, so it needs every stream at once:
:func:`rng_snapshot` takes the default CPU generator's state, every CUDA device's (once CUDA is
initialised) and every tracker stream's; :func:`restore_rng_snapshot` puts them all back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RNGSnapshot:
    """Every random stream a forward can draw from: the CPU generator, each CUDA device's
    generator (None while CUDA is not initialised: nothing can have drawn from it), and the
    tracker's named streams (None without a tracker)."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] | None
    tracker: dict[str, torch.Tensor] | None


def rng_snapshot() -> RNGSnapshot:
    """The current state of every stream (copies)."""
    cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else None
    return RNGSnapshot(torch.get_rng_state(), cuda,
                       _tracker.get_states() if _tracker is not None else None)


def restore_rng_snapshot(snapshot: RNGSnapshot) -> None:
    """Put every stream back to ``snapshot``. A snapshot taken before CUDA was initialised
    leaves the CUDA generators alone; one taken without a tracker, the tracker's streams."""
    torch.set_rng_state(snapshot.cpu)
    if snapshot.cuda is not None:
        torch.cuda.set_rng_state_all(snapshot.cuda)
    if snapshot.tracker is not None:
        if _tracker is None:
            raise ValueError("the RNG snapshot holds model-parallel streams, but the tracker is "
                             "gone (model_parallel_seed was not called in this process?)")
        _tracker.set_states(snapshot.tracker)
