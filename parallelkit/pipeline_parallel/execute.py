"""The one executor: run any schedule's actions on this rank's stage, and the training-step functions.

    loss = one_f_one_b_step(stage, ids, targets, num_microbatches=8, activation_shape=(s, b // 8, h))

Every step function splits the batch into m micro-batches along ``stage.batch_dim``, runs its
schedule (:mod:`.schedules`) through :func:`run_schedule`, sums the tied weights' gradients over
the embedding group and returns the mean loss over the micro-batches, on every pipeline rank.
Gradients accumulate into ``.grad`` (zero them between steps, as with ``loss.backward()``).
Only the first stage's rank needs ``inputs`` and only the last one's ``targets``; others may pass
None. ``activation_shape`` is the shape of what one chunk sends the next, ``[s, b/m, h]`` for a
sequence-first transformer (Megatron's ``tensor_shape``): receivers allocate it up front.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from parallelkit.distributed import comm
from parallelkit.distributed.p2p import Recv, Send
from parallelkit.pipeline_parallel.backward_split import backward_input
from parallelkit.pipeline_parallel.actions import RECV_F, SEND_B, SEND_F, Action, Schedule
from parallelkit.pipeline_parallel.check import check_schedule
from parallelkit.pipeline_parallel.schedules import build_schedule
from parallelkit.pipeline_parallel.stage import PipelineStage


def split_microbatches(batch: torch.Tensor, m: int, dim: int) -> list[torch.Tensor]:
    """``m`` equal micro-batches of ``batch`` along ``dim``; an error if they cannot be equal."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"number of micro-batches m={m!r} must be an integer >= 1")
    if batch.shape[dim] % m:
        raise ValueError(f"a batch of {batch.shape[dim]} samples (dim {dim} of shape "
                         f"{tuple(batch.shape)}) does not split into m={m} equal micro-batches; "
                         f"choose m dividing {batch.shape[dim]}")
    return list(torch.tensor_split(batch, m, dim))


def train_step(schedule_name: str, stage: PipelineStage, inputs: torch.Tensor | None,
               targets: torch.Tensor | None, num_microbatches: int,
               activation_shape: Sequence[int], timings: list | None = None) -> torch.Tensor:
    """One training step with schedule ``schedule_name`` (see ``schedules.SCHEDULES``)."""
    schedule = build_schedule(schedule_name, stage.pp_size, num_microbatches, len(stage.chunks))
    return run_schedule(schedule, stage, inputs, targets, activation_shape, timings)


def gpipe_step(stage, inputs, targets, num_microbatches, activation_shape, timings=None):
    """GPipe: all forwards, then all backwards; holds all m micro-batches' activations."""
    return train_step("gpipe", stage, inputs, targets, num_microbatches, activation_shape, timings)


def one_f_one_b_step(stage, inputs, targets, num_microbatches, activation_shape, timings=None):
    """1F1B: warm-up forwards, then one forward / one backward, then cool-down backwards."""
    return train_step("1f1b", stage, inputs, targets, num_microbatches, activation_shape, timings)


def interleaved_1f1b_step(stage, inputs, targets, num_microbatches, activation_shape, timings=None):
    """Interleaved 1F1B over the stage's v chunks; needs num_microbatches >= pp."""
    return train_step("interleaved-1f1b", stage, inputs, targets, num_microbatches,
                      activation_shape, timings)


def zb_h1_step(stage, inputs, targets, num_microbatches, activation_shape, timings=None):
    """ZB-H1: 1F1B with the backward split into B (input grad) and deferred W (weight grads)."""
    return train_step("zb-h1", stage, inputs, targets, num_microbatches, activation_shape, timings)


def run_schedule(schedule: Schedule, stage: PipelineStage, inputs: torch.Tensor | None,
                 targets: torch.Tensor | None, activation_shape: Sequence[int],
                 timings: list | None = None) -> torch.Tensor:
    """Run this rank's actions of ``schedule``; the step's mean loss (float64, every pp rank).

    ``timings``, if a list, receives ``(step, start, end)`` (``time.perf_counter``) per step.
    Before any message, every pp rank raises together if ``check_schedule`` rejects the schedule
    (a missing or misordered action: :class:`ScheduleError`), a rank lacks its inputs/targets, or
    (where ``comm.validation_enabled``) the ranks hold different schedules or activation shapes.
    """
    shape, prepared = tuple(activation_shape), []

    def local_checks():
        if (schedule.pp, schedule.chunks) != (stage.pp_size, len(stage.chunks)):
            raise ValueError(f"schedule {schedule.name} is for pp={schedule.pp} with "
                             f"{schedule.chunks} chunk(s) per rank, but this stage is rank "
                             f"{stage.pp_rank} of pp={stage.pp_size} with {len(stage.chunks)} "
                             "chunk(s)")
        _check_schedule_once(schedule)
        prepared.append(_RankRun(schedule, stage, inputs, targets, shape))

    # A schedule that cannot run to the end, a rank missing its batch, or ranks running different
    # schedules or activation shapes would hang (or abort) at some later message: every pipeline
    # rank raises here instead, together.
    comm.check_ranks_agree(
        stage.group, "run_schedule", ranks="pipeline-parallel", check=local_checks,
        schedule=schedule.name, microbatches=schedule.microbatches, chunks=schedule.chunks,
        actions_digest=_actions_digest(schedule), activation_shape=shape, dtype=stage.dtype,
        fix="every pipeline rank must run the same schedule with the same activation_shape")
    run = prepared[0]
    with torch.enable_grad(), stage.summing_tied_grads():
        run.run(timings)
    total = sum(run.losses, torch.zeros((), dtype=torch.float64, device=stage.device))
    with comm.entry_checked():
        return comm.all_reduce(total.double(), stage.group)  # non-last ranks add 0: exact


@functools.lru_cache(maxsize=64)
def _check_schedule_once(schedule: Schedule) -> None:
    """``check_schedule``, once per schedule (frozen, so equal content is an equal key); a
    schedule it rejects is not cached and raises its ScheduleError every time."""
    check_schedule(schedule)


@functools.lru_cache(maxsize=64)
def _actions_digest(schedule: Schedule) -> int:
    """The schedule's actions as one int, equal on ranks that hold equal schedules."""
    digest = hashlib.blake2b(repr(schedule.actions).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass
class _Slot:
    """What one (micro-batch, chunk) holds between its actions."""

    input: torch.Tensor | None = None        # received activation (a leaf requiring grad)
    output: torch.Tensor | None = None       # chunk output [s, b/m, h], or the scaled loss
    grad_output: torch.Tensor | None = None  # received gradient of ``output``
    grad_input: torch.Tensor | None = None   # gradient of ``input``, to send upstream
    weight_grad: object = None               # the W a split backward left


class _RankRun:
    def __init__(self, schedule: Schedule, stage: PipelineStage, inputs, targets, shape):
        self.schedule, self.stage, self.shape = schedule, stage, shape
        self.rank, self.last = stage.pp_rank, schedule.num_stages - 1
        holds = {schedule.stage(self.rank, c) for c in range(schedule.chunks)}
        m, dim = schedule.microbatches, stage.batch_dim
        for needed, batch, what in ((0, inputs, "inputs"), (self.last, targets, "targets")):
            if needed in holds and batch is None:
                raise ValueError(f"rank {self.rank} runs global stage {needed} and needs the {what}")
        self.inputs = split_microbatches(inputs, m, dim) if 0 in holds else None
        self.targets = split_microbatches(targets, m, dim) if self.last in holds else None
        self.split = schedule.split_backward(self.rank)
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.losses: list[torch.Tensor] = []

    def run(self, timings: list | None) -> None:
        compute = {"F": self.forward, "B": self.backward, "W": self.weight}
        for step in self.schedule.steps(self.rank):
            start = time.perf_counter()
            if step[0].is_comm:
                self.communicate(step)
            else:
                compute[step[0].kind](step[0], self.slots.setdefault(step[0][1:], _Slot()))
            if timings is not None:
                timings.append((step, start, time.perf_counter()))
        self.stage.p2p.finish()

    def forward(self, action: Action, slot: _Slot) -> None:
        s = self.schedule.stage(self.rank, action.chunk)
        x = self.inputs[action.microbatch] if s == 0 else slot.input
        y = self.stage.chunks[action.chunk](x)
        if s == self.last:
            # each micro-batch's mean loss / m: the gradients sum to those of the batch mean
            slot.output = self.stage.loss_fn(y, self.targets[action.microbatch]) / len(self.targets)
            self.losses.append(slot.output.detach())
        elif tuple(y.shape) != self.shape or y.dtype != self.stage.dtype:
            raise ValueError(f"global stage {s} produced {tuple(y.shape)} {y.dtype}, but the "
                             f"receiver expects activation_shape={self.shape} {self.stage.dtype}")
        else:
            slot.output = y

    def backward(self, action: Action, slot: _Slot) -> None:
        x = slot.input  # None on global stage 0, whose input (ids) needs no gradient
        if action[1:] in self.split:
            slot.grad_input, slot.weight_grad = backward_input(slot.output, slot.grad_output, x)
        else:
            torch.autograd.backward(slot.output, slot.grad_output)
            slot.grad_input = x.grad if x is not None else None
        slot.output = slot.grad_output = None  # the graph now lives in weight_grad, if anywhere

    def weight(self, action: Action, slot: _Slot) -> None:
        slot.weight_grad()
        slot.weight_grad = None

    def communicate(self, batch: tuple[Action, ...]) -> None:
        ops, into = [], []
        for action in batch:
            peer, _ = self.schedule.message(self.rank, action)
            slot = self.slots.setdefault(action[1:], _Slot())
            if action.kind == SEND_F:
                ops.append(Send(peer, slot.output.detach()))
            elif action.kind == SEND_B:
                grad = slot.grad_input if slot.grad_input is not None else torch.zeros_like(slot.input)
                ops.append(Send(peer, grad))
                slot.grad_input = slot.input = None
            else:
                ops.append(Recv(peer, self.shape, self.stage.dtype, self.stage.device))
                into.append((action, slot))
        for (action, slot), tensor in zip(into, self.stage.p2p.exchange(ops)):
            if action.kind == RECV_F:
                slot.input = tensor.requires_grad_()
            else:
                slot.grad_output = tensor
