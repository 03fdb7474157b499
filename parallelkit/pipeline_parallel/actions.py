"""Pipeline schedules as data: the actions each pipeline rank runs, in order.

Action kinds:

    F       forward of one micro-batch through one model chunk
    B       backward of that micro-batch: the gradient w.r.t. the chunk's input, and also the
            parameter gradients unless a W for the same (micro-batch, chunk) follows on this rank
    W       the parameter gradients a B left out (zero-bubble schedules)
    SEND_F / RECV_F   the chunk's output activation to / its input from the neighbouring stage
    SEND_B / RECV_B   the gradient of the chunk's input to / of its output from the neighbour

With ``v`` chunks per rank (interleaving), rank ``r`` holds chunks ``c = 0..v-1``, which are the
global stages ``c * pp + r``: stage ``k`` holds chunks k, k+pp, ... The embedding lives in global
stage 0 (rank 0, chunk 0), the head and loss in global stage ``pp*v - 1`` (last rank, last chunk).

Consecutive communication actions in a rank's list form one *batch*: the executor posts them
together (one ``batch_isend_irecv``) and waits for their receives before the next computation, as
Megatron's ``send_forward_recv_backward`` does. :func:`steps` is that grouping; the checker, the
simulator and the executor all iterate over it, so the checker proves what the executor runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

F, B, W = "F", "B", "W"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE_KINDS = (F, B, W)
COMM_KINDS = (SEND_F, RECV_F, SEND_B, RECV_B)


class Action(NamedTuple):
    """One step of one rank: ``kind`` on micro-batch ``microbatch`` of local model ``chunk``."""

    kind: str
    microbatch: int
    chunk: int = 0

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


class Message(NamedTuple):
    """What travels between two stages: the activation ("act") or its gradient ("grad") at the
    ``boundary`` between global stages ``boundary`` and ``boundary + 1``, for one micro-batch."""

    what: str
    boundary: int
    microbatch: int


@dataclass(frozen=True)
class Schedule:
    """The actions of every pipeline rank for one training step over ``microbatches``.

    ``actions[r]`` is rank ``r``'s list; ``chunks`` is the virtual pipeline size v.
    """

    name: str
    pp: int
    microbatches: int
    chunks: int
    actions: tuple[tuple[Action, ...], ...]

    @property
    def num_stages(self) -> int:
        return self.pp * self.chunks

    def stage(self, rank: int, chunk: int) -> int:
        """Global stage index of local ``chunk`` on pipeline ``rank``."""
        return chunk * self.pp + rank

    def location(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) of a global stage."""
        return stage % self.pp, stage // self.pp

    def message(self, rank: int, action: Action) -> tuple[int, Message]:
        """The peer rank of a communication action and the message it carries."""
        s, kind = action.chunk * self.pp + rank, action.kind
        if kind == SEND_F or kind == RECV_B:  # the boundary after this stage
            return (s + 1) % self.pp, Message("act" if kind == SEND_F else "grad", s, action.microbatch)
        if kind == RECV_F or kind == SEND_B:  # the boundary before it
            return (s - 1) % self.pp, Message("act" if kind == RECV_F else "grad", s - 1, action.microbatch)
        raise ValueError(f"{action} is not a communication")

    def steps(self, rank: int) -> list[tuple[Action, ...]]:
        return steps(self.actions[rank])

    def split_backward(self, rank: int) -> set[tuple[int, int]]:
        """(micro-batch, chunk) pairs whose B on ``rank`` leaves the parameter gradients to a W."""
        return {(a.microbatch, a.chunk) for a in self.actions[rank] if a.kind == W}

    def __str__(self) -> str:
        lines = [f"{self.name}: pp={self.pp} micro-batches={self.microbatches} chunks={self.chunks}"]
        for rank in range(self.pp):
            cells = ["[" + " ".join(map(str, s)) + "]" if s[0].is_comm else str(s[0])
                     for s in self.steps(rank)]
            lines.append(f"  rank {rank}: " + " ".join(cells))
        return "\n".join(lines)


def steps(actions) -> list[tuple[Action, ...]]:
    """Group a rank's actions into steps: one computation, or one batch of communications."""
    out: list[tuple[Action, ...]] = []
    for action in actions:
        if action.is_comm and out and out[-1][0].is_comm:
            out[-1] = out[-1] + (action,)
        else:
            out.append((action,))
    return out


class ScheduleError(ValueError):
    """The schedule would deadlock, mismatch a message, or compute something twice or never."""
