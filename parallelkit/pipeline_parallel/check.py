"""Replay a schedule with blocking communication: the deadlock checker, and the simulator's clock.

The replay models the strictest semantics any backend gives (NCCL's): a rank runs its steps in
order; a communication batch posts all its sends and receives at once and the rank waits until
every one of them is matched by the peer's opposite operation, matched in posting order per
channel (sender → receiver rank). A send therefore blocks until the receiver posts the receive.
If no rank can move and some have steps left, the schedule deadlocks. Because the executor runs
exactly :func:`~.actions.steps` of the same lists, a schedule that replays to the end cannot
hang the executor (gloo, which buffers small sends, is only more permissive).

Along the way the replay checks the data flow: each message carries what the receiver expects,
each F has its input, each B follows its F and has its output gradient, each W follows its B, and
every (micro-batch, chunk) is computed exactly once per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from parallelkit.pipeline_parallel.actions import (B, F, RECV_B, RECV_F, SEND_B, SEND_F, W, Action,
                                                   Message, Schedule, ScheduleError)


@dataclass(frozen=True)
class Interval:
    """One action's span on one rank's clock (computations, and communication batches)."""

    start: float
    end: float
    actions: tuple[Action, ...]


# Cost model: duration of a computation, and of one message once both sides have posted it.
Duration = Callable[[int, Action], float]


def replay(schedule: Schedule, compute_time: Duration | None = None,
           message_time: float = 0.0, rendezvous: bool = True) -> list[list[Interval]]:
    """Run ``schedule`` on a model clock; per rank, the intervals of its steps in order.

    ``compute_time(rank, action)`` defaults to 1 per computation. With ``rendezvous`` (the
    checker's semantics) a message starts when both ends have posted it, and a batch ends when
    its last message has arrived. Without it, sends are fire-and-forget (gloo's isend, or an
    NCCL send the sender does not wait for): a message leaves when it is posted, and only the
    receives hold a batch up. Messages take ``message_time``.
    Raises :class:`ScheduleError` on a deadlock or a data-flow error.
    """
    compute_time = compute_time or (lambda rank, action: 1.0)
    pp = schedule.pp
    rank_steps = [schedule.steps(r) for r in range(pp)]
    position, clock = [0] * pp, [0.0] * pp
    intervals: list[list[Interval]] = [[] for _ in range(pp)]
    flow = [_DataFlow(schedule, r) for r in range(pp)]
    # Per channel (src, dst): messages sent / receives posted in order, with their post times.
    sent: dict[tuple[int, int], list[tuple[Message, float]]] = {}
    received: dict[tuple[int, int], list[tuple[Message, float]]] = {}
    pending: dict[int, list[tuple[dict, tuple[int, int], int]]] = {}  # rank -> unmatched ops

    def advance(rank: int) -> bool:
        moved = False
        while position[rank] < len(rank_steps[rank]):
            step = rank_steps[rank][position[rank]]
            start = clock[rank]
            if not step[0].is_comm:
                flow[rank].compute(step[0])
                clock[rank] = start + compute_time(rank, step[0])
            else:
                if rank not in pending:  # reach the batch: post every operation of it
                    pending[rank] = [_post(schedule, rank, a, start, sent, received, flow[rank])
                                     for a in step]
                waits_for = [(other, key, index) for other, key, index in pending[rank]
                             if rendezvous or other is sent]  # eager sends wait for nobody
                if not all(len(other.get(key, ())) > index for other, key, index in waits_for):
                    return moved  # blocked until every peer has posted its side
                ends = [start]
                for other, key, index in waits_for:
                    mine = (received if other is sent else sent)[key][index]
                    theirs = other[key][index]
                    if mine[0] != theirs[0]:
                        send, recv = (theirs, mine) if other is sent else (mine, theirs)
                        raise ScheduleError(f"channel rank {key[0]} -> rank {key[1]}: message "
                                            f"#{index} sent is {send[0]} but the receiver expects "
                                            f"{recv[0]} (rank {rank} at {_text(step)})")
                    ends.append(max(mine[1], theirs[1]) + message_time)
                del pending[rank]
                for action in step:
                    flow[rank].arrive(action)
                clock[rank] = max(ends)
            intervals[rank].append(Interval(start, clock[rank], step))
            position[rank] += 1
            moved = True
        return moved

    while any([advance(rank) for rank in range(pp)]):  # a list: every rank gets its turn
        pass
    blocked = [r for r in range(pp) if position[r] < len(rank_steps[r])]
    if blocked:
        lines = [f"rank {r} waits at {_text(rank_steps[r][position[r]])} (step {position[r]})"
                 for r in blocked]
        raise ScheduleError(f"{schedule.name} (pp={pp}, m={schedule.microbatches}) deadlocks:\n  "
                            + "\n  ".join(lines))
    for key in set(sent) | set(received):
        if len(sent.get(key, ())) != len(received.get(key, ())):
            raise ScheduleError(f"channel rank {key[0]} -> rank {key[1]}: "
                                f"{len(sent.get(key, ()))} sends but "
                                f"{len(received.get(key, ()))} receives")
    for f in flow:
        f.finish()
    return intervals


def check_schedule(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless every rank can run ``schedule`` to the end."""
    replay(schedule)


def _post(schedule, rank, action, time, sent, received, flow):
    """Post one communication; return (the peer's side of the channel, channel, index)."""
    peer, message = schedule.message(rank, action)
    if action.kind in (SEND_F, SEND_B):
        flow.check_send(action)
        key, mine, other = (rank, peer), sent, received
    else:
        key, mine, other = (peer, rank), received, sent
    mine.setdefault(key, []).append((message, time))
    return other, key, len(mine[key]) - 1


def _text(step) -> str:
    return "[" + " ".join(map(str, step)) + "]" if step[0].is_comm else str(step[0])


class _DataFlow:
    """What one rank holds, to check that each action has what it needs."""

    def __init__(self, schedule: Schedule, rank: int):
        self.schedule, self.rank = schedule, rank
        self.done: dict[str, set[tuple[int, int]]] = {}  # kind -> {(micro-batch, chunk)}

    def _fail(self, action: Action, why: str):
        raise ScheduleError(f"{self.schedule.name}: rank {self.rank} {action}: {why}")

    def _has(self, kind: str, action: Action) -> bool:
        return action[1:] in self.done.get(kind, ())

    def _add(self, action: Action) -> None:
        self.done.setdefault(action.kind, set()).add(action[1:])

    def compute(self, action: Action) -> None:
        s, last = self.schedule.stage(self.rank, action.chunk), self.schedule.num_stages - 1
        if self._has(action.kind, action):
            self._fail(action, "runs twice")
        if action.kind == F and s > 0 and not self._has(RECV_F, action):
            self._fail(action, "forward before its input activation arrived")
        if action.kind == B and not self._has(F, action):
            self._fail(action, "backward before its forward")
        if action.kind == B and s < last and not self._has(RECV_B, action):
            self._fail(action, "backward before its output gradient arrived")
        if action.kind == W and not self._has(B, action):
            self._fail(action, "weight gradient before its backward")
        self._add(action)

    def check_send(self, action: Action) -> None:
        if not self._has(F if action.kind == SEND_F else B, action):
            self._fail(action, "sends a tensor not computed yet")

    def arrive(self, action: Action) -> None:
        if action.kind in (RECV_F, RECV_B):
            if self._has(action.kind, action):
                self._fail(action, "received twice")
            self._add(action)

    def finish(self) -> None:
        for chunk in range(self.schedule.chunks):
            for mb in range(self.schedule.microbatches):
                for kind in (F, B):
                    if not self._has(kind, Action(kind, mb, chunk)):
                        self._fail(Action(kind, mb, chunk), "never runs")
