"""This rank's part of a pipeline: its model chunks, the loss, its groups, and tied weights.

    stage = PipelineStage.from_layers(model.blocks, loss_fn, pre=model.embed,
                                      post=nn.Sequential(model.ln_f, model.lm_head))
    stage.sync_tied_parameters()     # once, after building: the last stage takes the first's copy
    loss = one_f_one_b_step(stage, ids, targets, num_microbatches=8, activation_shape=(s, b // 8, h))

A weight used by the first stage and the last one (an embedding tied to the LM head) exists once
per holding rank; Megatron's embedding group (first and last stage of each pipeline) keeps the
copies equal: both start from the first stage's values and, after every step, both take the sum
of the two gradients. The step functions do that sum; only ``sync_tied_parameters`` is yours.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.distributed import comm, mpu
from parallelkit.distributed.p2p import PipelineP2P
from parallelkit.pipeline_parallel.partition import stage_chunks


class PipelineStage:
    """Args:
        chunks: this rank's model chunks, ``chunks[c]`` being global stage ``c * pp + pp_rank``.
        loss_fn: ``loss_fn(last_stage_output, targets)``, the mean loss of one micro-batch.
        pp_group: the pipeline group (default: the MPU's).
        batch_dim: the dim of inputs and targets split into micro-batches (1: ``[s, b]``).
        tied_parameters: parameters both the first and the last stage use; each rank keeps the
            ones its chunks hold.
        embedding_group: first + last stage, over which tied gradients are summed (default: the
            MPU's embedding group; needed only when this rank holds a tied parameter and pp > 1).
    """

    def __init__(self, chunks: Sequence[nn.Module], loss_fn: Callable, pp_group=None,
                 batch_dim: int = 1, tied_parameters: Sequence[nn.Parameter] = (),
                 embedding_group: dist.ProcessGroup | None = None):
        if not chunks:
            raise ValueError("a pipeline stage needs at least one model chunk")
        self.group = pp_group if pp_group is not None else mpu.get_pp_group()
        self.pp_rank, self.pp_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.chunks, self.loss_fn, self.batch_dim = list(chunks), loss_fn, batch_dim
        params = list(self.parameters())
        if not params:
            raise ValueError("the stage's chunks hold no parameters")
        self.device = params[0].device
        self.dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        mine = {id(p) for p in params}
        self.tied_parameters = [p for p in tied_parameters if id(p) in mine]
        self.embedding_group = embedding_group
        if self.tied_parameters and self.pp_size > 1 and embedding_group is None:
            if not mpu.is_in_embedding_group():
                raise ValueError(f"pipeline rank {self.pp_rank} holds tied parameters but is not "
                                 "in the MPU's embedding group (first and last stage only)")
            self.embedding_group = mpu.get_embedding_group()
        elif self.pp_size == 1 or not self.tied_parameters:
            self.embedding_group = None  # one rank holds both uses: nothing to keep in sync
        self.p2p = PipelineP2P(self.group)

    @classmethod
    def from_layers(cls, layers: Sequence[nn.Module], loss_fn: Callable, pre: nn.Module | None = None,
                    post: nn.Module | None = None, virtual_pp: int | None = None,
                    costs: Sequence[float] | None = None, pp_group=None, **kwargs) -> "PipelineStage":
        """Partition ``layers`` (see :func:`~.partition.stage_chunks`) and keep this rank's chunks.
        ``virtual_pp`` defaults to the MPU's (1 without interleaving). Weights that ``pre`` and
        ``post`` share are the tied parameters."""
        group = pp_group if pp_group is not None else mpu.get_pp_group()
        if virtual_pp is None:
            virtual_pp = (mpu.get_virtual_pp_world_size() if mpu.is_initialized() else None) or 1
        chunks = stage_chunks(layers, dist.get_rank(group), dist.get_world_size(group), virtual_pp,
                              pre, post, costs)
        return cls(chunks, loss_fn, group, tied_parameters=shared_parameters(pre, post), **kwargs)

    def parameters(self) -> Iterator[nn.Parameter]:
        seen = set()
        for chunk in self.chunks:
            for p in chunk.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def sync_tied_parameters(self) -> None:
        """Copy the first stage's tied weights into the last stage's (a collective over the
        embedding group: both call it). The others add zeros to an all-reduce, which is exact."""
        for p in self._tied_across_ranks():
            with torch.no_grad():
                p.copy_(comm.all_reduce(p if self.pp_rank == 0 else torch.zeros_like(p),
                                        self.embedding_group))

    @contextlib.contextmanager
    def summing_tied_grads(self):
        """Inside, tied parameters' ``.grad`` collects only this step's gradient; on exit it is
        summed over the embedding group and added to what ``.grad`` held before (so gradient
        accumulation over steps does not sum earlier steps twice)."""
        tied = list(self._tied_across_ranks())
        before = [p.grad for p in tied]
        for p in tied:
            p.grad = None
        try:
            yield
        except BaseException:  # no all-reduce: the peer may never get there; report, not hang
            for p, old in zip(tied, before):
                p.grad = old
            raise
        for p, old in zip(tied, before):
            step = comm.all_reduce(p.grad if p.grad is not None else torch.zeros_like(p),
                                   self.embedding_group)
            p.grad = step if old is None else old + step

    def _tied_across_ranks(self) -> list[nn.Parameter]:
        return self.tied_parameters if self.embedding_group is not None else []


def shared_parameters(a: nn.Module | None, b: nn.Module | None) -> list[nn.Parameter]:
    """Parameters (the same object) that both modules hold, e.g. a tied embedding and LM head."""
    if a is None or b is None:
        return []
    theirs = {id(p) for p in b.parameters()}
    return [p for p in a.parameters() if id(p) in theirs]
