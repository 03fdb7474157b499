"""The schedules: GPipe, 1F1B, interleaved 1F1B and ZB-H1 as lists of actions per rank.

Each builder orders every rank's computations (F, B, W; see :mod:`.actions`); then
:func:`add_communication` places the sends and receives those imply, and :func:`build_schedule`
checks the result (deadlock-free under blocking point-to-point, every message matched) before
anything runs:

    schedule = build_schedule("1f1b", pp=4, microbatches=8)
    print(schedule)                              # the actions of every rank
    simulate(schedule, Costs(forward=1, backward=2)).bubble_fraction   # 3/11
"""

from __future__ import annotations

import bisect
import functools

from parallelkit.pipeline_parallel.actions import (B, F, RECV_B, RECV_F, SEND_B, SEND_F, W, Action,
                                                   Message, Schedule, ScheduleError)
from parallelkit.pipeline_parallel.check import check_schedule

def gpipe_order(pp: int, m: int) -> list[list[Action]]:
    """GPipe: every forward, then every backward (all m micro-batches' activations held)."""
    return [[Action(F, i) for i in range(m)] + [Action(B, i) for i in range(m)] for _ in range(pp)]


def one_f_one_b_order(pp: int, m: int) -> list[list[Action]]:
    """1F1B (PipeDream-flush): rank r runs pp-1-r warm-up forwards, then alternates one forward
    and one backward, then drains the remaining backwards. At most pp - r micro-batches in flight.

    m < pp is allowed: the warm-up is capped at m and the schedule degenerates towards GPipe
    (still correct, bubble (pp-1)/(m+pp-1))."""
    orders = []
    for rank in range(pp):
        warmup = min(pp - 1 - rank, m)
        order = [Action(F, i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [Action(F, warmup + i), Action(B, i)]
        orders.append(order + [Action(B, i) for i in range(m - warmup, m)])
    return orders


def interleaved_order(pp: int, m: int, v: int) -> list[tuple[int, int]]:
    """The (micro-batch, chunk) order of an interleaved rank's forwards (Megatron-core's table):
    groups of pp micro-batches go through chunk 0, then chunk 1, ...; when pp does not divide m
    the last group also takes the remainder (pp to 2pp-1 micro-batches), so that a micro-batch
    coming back to rank 0 for its next chunk has always gone around all pp ranks already."""
    starts = list(range(0, m - m % pp if m >= pp else m, pp)) or [0]
    bounds = list(zip(starts, starts[1:] + [m]))
    return [(mb, chunk) for first, end in bounds for chunk in range(v) for mb in range(first, end)]


def interleaved_1f1b_order(pp: int, m: int, v: int) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron's virtual pipeline): each rank holds v chunks, forwards follow
    :func:`interleaved_order`, backwards the same table with the chunks reversed. Rank r warms up
    with 2(pp-1-r) + (v-1)·g forwards (g = pp, or the larger last group's size), so that each
    backward's forward has run and its gradient can have come back by the time it is due."""
    if m < pp:
        raise ValueError(f"interleaved 1F1B needs at least pp={pp} micro-batches, got m={m}: with "
                         "fewer, rank 0 would wait for micro-batches to come around for its next "
                         "chunk; use 1F1B or GPipe, or more micro-batches")
    forwards = interleaved_order(pp, m, v)
    backwards = [(mb, v - 1 - chunk) for mb, chunk in forwards]
    total, group = m * v, pp + m % pp
    orders = []
    for rank in range(pp):
        warmup = min(2 * (pp - 1 - rank) + (v - 1) * group, total)
        order = [Action(F, *forwards[i]) for i in range(warmup)]
        for i in range(total - warmup):
            order += [Action(F, *forwards[warmup + i]), Action(B, *backwards[i])]
        orders.append(order + [Action(B, *backwards[i]) for i in range(total - warmup, total)])
    return orders


def zb_h1_order(pp: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): 1F1B with the backward split
    into B (input gradient, on the critical path) and W (parameter gradients, deferred).

    Rank r keeps 1F1B's forwards and B's but runs its first r steady steps without a W; from then
    on each step ends with the oldest pending W, and the last W's fill the cool-down. The B chain
    from the last stage back to the first no longer waits for parameter gradients, which shrinks
    the bubble from (pp-1)(F+B+W) to (pp-1)(F+B-W); the micro-batches in flight (F run, W not yet)
    stay at most pp - r + r = pp, as in 1F1B."""
    orders = []
    for rank in range(pp):
        warmup = min(pp - 1 - rank, m)
        order = [Action(F, i) for i in range(warmup)]
        pending_w = 0
        for i in range(m):  # the i-th backward, preceded by a forward while forwards remain
            if warmup + i < m:
                order.append(Action(F, warmup + i))
            order.append(Action(B, i))
            if i >= rank:
                order.append(Action(W, pending_w))
                pending_w += 1
        orders.append(order + [Action(W, i) for i in range(pending_w, m)])
    return orders


def add_communication(pp: int, v: int, orders: list[list[Action]]) -> tuple[tuple[Action, ...], ...]:
    """Insert the sends and receives that every computation implies.

    A send goes right after the computation that produced its tensor. A receive is placed by a
    reference timeline (every computation costs 1, a full backward 2, messages are free; see
    :func:`reference_timeline`): in the receiver's first gap between computations that ends at or
    after the moment the sender sends. So in that timeline the receiver has posted the receive by
    the time the sender sends (neither waits on the other), receives on one channel keep the
    sender's order (NCCL matches point-to-point messages by order, not by tag), and a rank that
    idles waiting for an input has its receive already posted. The sends after one computation
    and the receives before the next form one batch (see :func:`steps`).
    """
    times = reference_timeline(pp, v, orders)
    starts = [[start for start, _ in rank_times] for rank_times in times]  # non-decreasing
    sends_after = [[[] for _ in order] for order in orders]   # [rank][compute index] -> actions
    recvs_before = [[[] for _ in order] for order in orders]
    for rank, order in enumerate(orders):
        for index, action in enumerate(order):
            for send, recv, peer, _ in _messages_out(pp, v, rank, action):
                sends_after[rank][index].append(send)
                sent_at = times[rank][index][1]
                # first gap of the peer whose end (the next computation's start) is >= sent_at;
                # the consumer itself starts after sent_at, so this gap is never later than it
                gap = bisect.bisect_left(starts[peer], sent_at)
                recvs_before[peer][gap].append((sent_at, rank, recv))
    for per_rank in recvs_before:
        for recvs in per_rank:
            recvs.sort(key=lambda item: item[:2])  # sort is stable: one channel keeps send order
    return tuple(tuple(a for i, action in enumerate(order)
                       for a in (*(r for _, _, r in recvs_before[rank][i]), action,
                                 *sends_after[rank][i]))
                 for rank, order in enumerate(orders))


def _messages_out(pp: int, v: int, rank: int, action: Action):
    """(send, matching receive, receiving rank, message) for each tensor ``action`` produces."""
    s, mb = action.chunk * pp + rank, action.microbatch
    if action.kind == F and s + 1 < pp * v:
        yield (Action(SEND_F, mb, action.chunk), Action(RECV_F, mb, (s + 1) // pp), (s + 1) % pp,
               Message("act", s, mb))
    if action.kind == B and s > 0:
        yield (Action(SEND_B, mb, action.chunk), Action(RECV_B, mb, (s - 1) // pp), (s - 1) % pp,
               Message("grad", s - 1, mb))


def reference_timeline(pp: int, v: int, orders: list[list[Action]]) -> list[list[tuple[int, int]]]:
    """(start, end) of every computation when each starts as soon as its rank is free and its
    input has been produced, with F = B = W = 1 and a B without a W costing 2 (free messages).

    Raises ScheduleError if the orders cannot run at all (a rank waits for a tensor that another
    rank produces only after waiting for this one, or that nobody produces).
    """
    splits = [{(a.microbatch, a.chunk) for a in order if a.kind == W} for order in orders]
    ready: dict[Message, int] = {}  # message -> time its producer finished
    times: list[list[tuple[int, int]]] = [[] for _ in orders]
    clock = [0] * pp
    moved = True
    while moved:
        moved = False
        for rank, order in enumerate(orders):
            while len(times[rank]) < len(order):
                action = order[len(times[rank])]
                needs = _message_in(pp, v, rank, action)
                if needs is not None and needs not in ready:
                    break
                start = max(clock[rank], ready[needs] if needs is not None else 0)
                full_backward = action.kind == B and (action.microbatch, action.chunk) not in splits[rank]
                clock[rank] = start + (2 if full_backward else 1)
                times[rank].append((start, clock[rank]))
                for *_, message in _messages_out(pp, v, rank, action):
                    ready[message] = clock[rank]
                moved = True
    stuck = [(rank, order[len(times[rank])]) for rank, order in enumerate(orders)
             if len(times[rank]) < len(order)]
    if stuck:
        raise ScheduleError("the computation orders cannot run: " + ", ".join(
            f"rank {rank} waits forever at {action}" for rank, action in stuck))
    return times


def _message_in(pp: int, v: int, rank: int, action: Action) -> Message | None:
    """The message a computation consumes from another stage, if any."""
    s = action.chunk * pp + rank
    if action.kind == F and s > 0:
        return Message("act", s - 1, action.microbatch)
    if action.kind == B and s + 1 < pp * v:
        return Message("grad", s, action.microbatch)
    return None


SCHEDULES = {"gpipe": gpipe_order, "1f1b": one_f_one_b_order,
             "interleaved-1f1b": interleaved_1f1b_order, "zb-h1": zb_h1_order}
INTERLEAVED = {"interleaved-1f1b"}


@functools.lru_cache(maxsize=256)
def build_schedule(name: str, pp: int, microbatches: int, chunks: int = 1) -> Schedule:
    """The checked schedule ``name`` (one of :data:`SCHEDULES`) for pp ranks, m micro-batches and
    ``chunks`` model chunks per rank (interleaved schedules only; the others take 1)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    for what, value in (("pp", pp), ("microbatches", microbatches), ("chunks", chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}={value!r} must be an integer >= 1")
    if name in INTERLEAVED:
        orders = SCHEDULES[name](pp, microbatches, chunks)
    elif chunks != 1:
        raise ValueError(f"schedule {name!r} runs one model chunk per rank, got chunks={chunks}; "
                         "use 'interleaved-1f1b' for a virtual pipeline")
    else:
        orders = SCHEDULES[name](pp, microbatches)
    schedule = Schedule(name, pp, microbatches, chunks, add_communication(pp, chunks, orders))
    check_schedule(schedule)
    return schedule
