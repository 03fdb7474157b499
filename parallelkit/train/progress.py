"""What rank 0 shows while training and what a run reports: tokens/s, the MFU, peak memory, a
progress bar and the loss plot.

MFU (model FLOPs utilisation, PaLM's definition): the model's training FLOPs per token
(``model.flops_per_token``: 6 N + 12 L h s) times the tokens per second of the whole job, over
the peak of all its devices: ``--peak-tflops`` per device when given, else a square GEMM timed on
rank 0's device in the run's dtype at start (on CPU with the thread count a rank has), times the
world size. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's maximum
resident set size (``getrusage``, which for a forked rank includes the pages it shares with its
parent).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch

GEMM_SIZE = {"cpu": 512, "cuda": 8192}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` square matmuls on ``device`` in ``dtype``."""
    n = GEMM_SIZE[device.type]
    a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS"  # Linux: KiB


@dataclass
class TrainResult:
    """Rank 0's account of a run (every rank returns one; the losses are global)."""

    losses: dict[int, float]            # step number (1-based) -> loss, earlier runs' included
    steps_run: list[int]                # the steps this call ran
    resumed_from: int | None            # the checkpoint's step, if this call resumed
    tokens_per_s: float                 # whole job, steps after the first (warm-up) when > 1
    mfu: float                          # fraction of the peak
    peak_flops: float                   # per device
    peak_memory: int                    # bytes, this rank
    memory_kind: str
    layout: str
    checkpoint: str | None = None       # the last checkpoint written
    step_times: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.losses[max(self.losses)] if self.losses else None

    def summary(self) -> str:
        if not self.steps_run:
            return f"nothing to run: the checkpoint is at step {self.resumed_from} ({self.layout})"
        return (f"step {self.steps_run[-1]} | final loss {self.final_loss:.4f} | "
                f"{self.tokens_per_s:,.0f} tokens/s | MFU {100 * self.mfu:.2f}% of "
                f"{self.peak_flops / 1e12:.3g} TFLOP/s per device | peak memory "
                f"{self.peak_memory / 2 ** 20:,.0f} MiB ({self.memory_kind}, rank 0) | "
                f"{self.layout}")


class Meter:
    """Times steps, and drives rank 0's bar (tqdm) with loss, tokens/s, MFU and memory."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_total: float,
                 device: torch.device, first: int, last: int, show: bool):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total, self.device = peak_total, device
        self.times: list[float] = []
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=last, initial=first, desc="train", unit="step",
                            dynamic_ncols=True)
        self._start = None

    def start_step(self) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def end_step(self, loss: float) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self._start)
        if self.bar is not None:
            rate = self.tokens_per_step / self.times[-1]
            memory, _ = peak_memory_bytes(self.device)
            self.bar.set_postfix_str(f"loss {loss:.4f} | {rate:,.0f} tok/s | MFU "
                                     f"{100 * self.mfu(rate):.2f}% | mem "
                                     f"{memory / 2 ** 20:,.0f} MiB", refresh=False)
            self.bar.update()

    def tokens_per_s(self) -> float:
        times = self.times[1:] if len(self.times) > 1 else self.times
        return self.tokens_per_step * len(times) / sum(times) if times else 0.0

    def mfu(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / self.peak_total

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(losses: dict[int, float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(losses)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [losses[s] for s in steps])
    ax.set(xlabel="step", ylabel="loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
