"""Simulate a schedule under per-action costs: timeline, bubble fraction, activations in flight.

    sim = simulate(build_schedule("1f1b", pp=4, microbatches=8), Costs(forward=1, backward=2))
    sim.bubble_fraction            # 3/11 = (p-1)/(m+p-1)
    sim.peak_activations           # (4, 3, 2, 1): micro-batches whose activations a rank holds
    print(format_timeline(sim))    # or: python -m parallelkit.pipeline_parallel.timeline

The clock is :func:`~.check.replay`'s: a rank waits at a batch for its receives (and, with
``rendezvous``, for its sends to be received). ``costs`` is one :class:`Costs` for every rank or
one per rank (stages differ: the first holds the embedding, the last the head and loss). The
bubble is the time a rank does not compute (waiting, and communicating) within the step, from
the first rank's start to the last rank's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Sequence

from parallelkit.pipeline_parallel.actions import B, F, W, Action, Schedule
from parallelkit.pipeline_parallel.check import Interval, replay


@dataclass(frozen=True)
class Costs:
    """Time of each action on one model chunk. A B that is not split (no W follows it for the
    same micro-batch) is a full backward and costs ``backward + weight``."""

    forward: float = 1.0
    backward: float = 1.0  # input-gradient part
    weight: float = 1.0    # parameter-gradient part
    p2p: float = 0.0       # one message, from the moment both ends have posted it


@dataclass(frozen=True)
class Simulation:
    schedule: Schedule
    costs: tuple[Costs, ...]         # per rank
    intervals: list[list[Interval]]  # per rank, every step (computations and batches)
    makespan: float
    busy: tuple[float, ...]          # per rank: time spent computing
    peak_activations: tuple[int, ...]

    @property
    def idle(self) -> tuple[float, ...]:
        return tuple(self.makespan - b for b in self.busy)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time: sum(idle) / (pp * makespan)."""
        return sum(self.idle) / (self.schedule.pp * self.makespan)


def action_cost(costs: Costs, action: Action, split: bool) -> float:
    if action.kind == F:
        return costs.forward
    if action.kind == B:
        return costs.backward if split else costs.backward + costs.weight
    if action.kind == W:
        return costs.weight
    raise ValueError(f"{action} is not a computation")


def simulate(schedule: Schedule, costs: Costs | Sequence[Costs] = Costs(),
             rendezvous: bool = False) -> Simulation:
    """Replay ``schedule`` under ``costs`` (one for all ranks, or one per rank; a message takes
    the largest ``p2p``). Sends are fire-and-forget unless ``rendezvous`` (then a send also waits
    for the receiver to post, as the deadlock checker assumes)."""
    costs = (costs,) * schedule.pp if isinstance(costs, Costs) else tuple(costs)
    if len(costs) != schedule.pp:
        raise ValueError(f"got {len(costs)} per-rank costs for pp={schedule.pp}")
    splits = [schedule.split_backward(rank) for rank in range(schedule.pp)]

    def compute_time(rank: int, action: Action) -> float:
        return action_cost(costs[rank], action, (action.microbatch, action.chunk) in splits[rank])

    intervals = replay(schedule, compute_time, max(c.p2p for c in costs), rendezvous)
    makespan = max(rank[-1].end for rank in intervals if rank)
    busy = tuple(sum(i.end - i.start for i in rank if not i.actions[0].is_comm)
                 for rank in intervals)
    return Simulation(schedule, costs, intervals, makespan, busy, peak_activations(schedule))


def peak_activations(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most (micro-batch, chunk) pairs whose forward has run and whose last backward
    action (W when split, else B) has not: the activations the rank must hold at once. A chunk
    holds 1/v of the rank's layers, so with interleaving divide by v for full-stage units."""
    peaks = []
    for rank in range(schedule.pp):
        split = schedule.split_backward(rank)
        held = peak = 0
        for a in schedule.actions[rank]:
            if a.kind == F:
                held += 1
                peak = max(peak, held)
            elif a.kind == (W if (a.microbatch, a.chunk) in split else B):
                held -= 1
        peaks.append(peak)
    return tuple(peaks)


def bubble_formula(name: str, pp: int, m: int, chunks: int = 1, costs: Costs = Costs()) -> float:
    """The textbook bubble fraction of schedule ``name`` (P2P time 0).

    GPipe and 1F1B: (p-1)/(m+p-1). Interleaved: (p-1)/(v·m+p-1). ZB-H1: the idle time per rank
    is (p-1)(F+B-W) against 1F1B's (p-1)(F+B+W), on m(F+B+W) of work.
    """
    if name in ("gpipe", "1f1b"):
        return (pp - 1) / (m + pp - 1)
    if name == "interleaved-1f1b":
        return (pp - 1) / (chunks * m + pp - 1)
    if name == "zb-h1":
        idle = (pp - 1) * (costs.forward + costs.backward - costs.weight)
        return idle / (m * (costs.forward + costs.backward + costs.weight) + idle)
    raise ValueError(f"no bubble formula for schedule {name!r}")


def format_timeline(sim: Simulation, unit: float | None = None, max_columns: int = 400) -> str:
    """The simulated timeline as text, then per-rank idle time, bubble and activations in flight.

    ``unit``: time per column (default: the smallest positive action cost).
    """
    unit = unit or min(x for c in sim.costs for x in (c.forward, c.backward, c.weight) if x > 0)
    columns = math.ceil(sim.makespan / unit - 1e-9)
    labels = [str(i.actions[0]) for rank in sim.intervals for i in rank if not i.actions[0].is_comm]
    width = max(map(len, labels), default=1)
    rows = []
    for rank, intervals in enumerate(sim.intervals):
        cells = ["." * width] * columns
        for interval in intervals:
            if interval.actions[0].is_comm:
                continue
            first, last = round(interval.start / unit), round(interval.end / unit)
            for column in range(first, min(max(last, first + 1), columns)):
                cells[column] = str(interval.actions[0]).ljust(width)
        shown = cells[:max_columns] + (["..."] if columns > max_columns else [])
        rows.append(f"rank {rank:>2} | " + " ".join(shown))
    s = sim.schedule
    costs = sim.costs[0]
    same = all(c == costs for c in sim.costs)
    lines = [f"{s.name}: pp={s.pp} m={s.microbatches} v={s.chunks}   "
             + (f"costs F={costs.forward:g} B={costs.backward:g} W={costs.weight:g} "
                f"p2p={costs.p2p:g}" if same else "costs per rank")
             + f"   one column = {unit:g}",
             *rows, "",
             "idle per rank:      " + " ".join(f"{x:g}" for x in sim.idle),
             "activations held:   " + " ".join(map(str, sim.peak_activations))
             + "  (peak per rank, in micro-batch x chunk)",
             f"bubble fraction:    {sim.bubble_fraction:.4f}   (makespan {sim.makespan:g})"]
    if same:
        formula = bubble_formula(s.name, s.pp, s.microbatches, s.chunks, costs)
        lines[-1] += f"   formula {formula:.4f}"
    return "\n".join(lines)
