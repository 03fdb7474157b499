"""Point-to-point transfers between pipeline stages: the one module that calls torch.distributed's
sends and receives (collectives stay in :mod:`parallelkit.distributed.comm`).

    p2p = PipelineP2P(mpu.get_pp_group())
    x, = p2p.exchange([Send(next_rank, y), Recv(prev_rank, (s, b, h), torch.float32)])
    p2p.finish()                      # wait for the sends still in flight (end of the step)

One :meth:`~PipelineP2P.exchange` posts its operations together with ``batch_isend_irecv`` (one
NCCL group, so a rank that sends to and receives from the same peer cannot deadlock against it)
and returns once every *receive* has arrived. Sends are left in flight and waited for at
:meth:`~PipelineP2P.finish`, so a rank does not idle until its neighbour gets round to posting the
matching receive. Shapes are known up front: the receiver allocates a buffer of the shape and dtype
it is told, as Megatron's ``tensor_shape``. Messages between two ranks are matched in posting
order (NCCL has no tags), which pipeline schedules guarantee (see pipeline_parallel.check).
Works on gloo (CPU tensors) and NCCL (CUDA tensors, after ``torch.cuda.set_device``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Send:
    """Send ``tensor`` to group rank ``peer``."""

    peer: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class Recv:
    """Receive a ``shape``/``dtype`` tensor from group rank ``peer`` into a new buffer."""

    peer: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device | str = "cpu"


class PipelineP2P:
    """Batched sends and receives between ranks of one pipeline group.

    Creating it on NCCL runs one all-reduce over the group, which every member must join: NCCL
    wants the first operation on a communicator to involve all its ranks, and a batch of
    point-to-point operations between two of them may not.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._global_ranks = [dist.get_global_rank(group, r) for r in range(self.size)]
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []  # sends, and what they read
        self.messages_sent = 0
        self.bytes_sent = 0
        if self.size > 1 and dist.get_backend(group) == "nccl":
            from parallelkit.distributed import comm

            comm.all_reduce(torch.zeros(1, device=torch.cuda.current_device()), group)

    def exchange(self, ops: Sequence[Send | Recv]) -> list[torch.Tensor]:
        """Post ``ops`` together; return the received tensors, in the order of the Recv ops."""
        p2p_ops, received, recv_works = [], [], []
        for op in ops:
            if not 0 <= op.peer < self.size or op.peer == self.rank:
                raise ValueError(f"peer {op.peer} is not another rank of this pipeline group "
                                 f"(rank {self.rank} of {self.size})")
            peer = self._global_ranks[op.peer]
            if isinstance(op, Send):
                tensor = op.tensor.detach().contiguous()
                p2p_ops.append(dist.P2POp(dist.isend, tensor, peer, self.group))
                self.messages_sent += 1
                self.bytes_sent += tensor.numel() * tensor.element_size()
            else:
                tensor = torch.empty(op.shape, dtype=op.dtype, device=op.device)
                p2p_ops.append(dist.P2POp(dist.irecv, tensor, peer, self.group))
                received.append(tensor)
        if not p2p_ops:
            return []
        works = dist.batch_isend_irecv(p2p_ops)
        if len(works) != len(p2p_ops):
            # NCCL coalesces the batch into one work: waiting on it orders the current CUDA stream
            # after the whole group (it does not block the CPU)
            recv_works = list(works)
        else:  # gloo: one work per operation
            for op, work in zip(p2p_ops, works):
                if op.op is dist.isend:
                    self._in_flight.append((work, op.tensor))  # keep the tensor alive until sent
                else:
                    recv_works.append(work)
        for work in recv_works:
            work.wait()
        self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]
        return received

    def finish(self) -> None:
        """Wait for every send still in flight."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight = []
