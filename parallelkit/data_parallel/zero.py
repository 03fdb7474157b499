"""ZeRO stage 1: the optimizer's state split across data-parallel ranks.

    model = DistributedDataParallel(model, use_distributed_optimizer=True)
    optimizer = DistributedOptimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    loss.backward(); model.finish_grad_sync()        # reduce-scatter: each rank its shard
    optimizer.clip_grad_norm(1.0)                    # optional
    optimizer.step()                                 # update the shard, all-gather the parameters
    optimizer.zero_grad()

Each bucket's flat buffer ``[numel]`` (``numel`` a multiple of the size p of the bucket's group:
the DP group, or the expert-DP group for a bucket of expert-parallel parameters) splits into p
equal shards; the group's rank r owns ``[r * numel/p, (r+1) * numel/p)``. After the
reduce-scatter in backward it holds the averaged gradient of just that range
(``bucket.grad_shard``). The wrapped optimizer
(torch's AdamW, unchanged) is built over *master* tensors: one view per parameter piece inside
the range, cut from a flat master copy of the shard, so Adam's moments cost 1/p of the model per
rank and per-parameter options (param groups) still apply. ``step`` updates the masters, writes
them (cast to the model dtype) into this rank's range of the bucket's parameter buffer, and
all-gathers that buffer in place: ``param.data`` are views into it, so no copy follows.

Master precision: a bf16/fp16 model gets fp32 masters by default (the bf16 weights are then only
the rounding of the fp32 masters the optimizer keeps); fp32/fp64 models keep their dtype. Where
the masters' dtype is the buckets' (fp32 masters over DDP's default fp32 main-grad buckets, or an
fp32/fp64 model), the masters' gradients are views of the reduce-scatter output itself; otherwise
(``grad_dtype=torch.bfloat16``) they are cast from it once per round.

fp16: the loss is scaled and the fp32 master gradients unscaled by a
:class:`~parallelkit.data_parallel.grad_scaler.DynamicGradScaler` (``grad_scaler="auto"``), and a
step with an inf/nan in any rank's shard is skipped on every rank (``step()`` returns False).

A parameter that no rank computed a gradient for (``param.main_grad is None`` after
``finish_grad_sync``) has its masters' ``.grad`` set to None for that step, so the inner optimizer
skips it as torch's does in one process: no weight decay, no moment update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Type

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.data_parallel import clip
from parallelkit.data_parallel.buckets import Bucket, accumulated_grad, check_replicas_agree
from parallelkit.data_parallel.ddp import DistributedDataParallel
from parallelkit.data_parallel.grad_scaler import (DynamicGradScaler, LossScaling,
                                                   default_found_inf_groups, resolve_grad_scaler)
from parallelkit.distributed import comm, mpu


@dataclass
class Shard:
    """This rank's range ``[start, start + numel)`` of one bucket, in master precision."""

    bucket: Bucket
    start: int                 # rank * numel/p, the rank in the bucket's group
    master: torch.Tensor       # [numel/p] master weights of the range
    master_grad: torch.Tensor  # [numel/p] their gradient (the bucket's grad_shard when same dtype)
    pieces: list[tuple[nn.Parameter, torch.Tensor]]  # (model parameter, its master view)
    piece_grads: list[torch.Tensor]  # per piece, its view of master_grad


class DistributedOptimizer(LossScaling):
    """Wraps a torch optimizer so that each DP rank keeps state for its shard only.

    Args:
        model: a :class:`DistributedDataParallel` built with ``use_distributed_optimizer=True``.
        optimizer_cls: the optimizer to wrap (default ``torch.optim.AdamW``); every DP rank must
            pass the same class, groups and options (checked: each rank updates its own shard).
        param_groups: like a torch optimizer's: dicts with ``"params"`` (model parameters) and
            per-group options. Default: one group with every synchronised parameter.
        master_dtype: the masters' dtype; default float32 for 16-bit models, else the model's.
        grad_scaler: "auto" (a DynamicGradScaler when some parameter is fp16, else none), None,
            or a scaler of your own; see :class:`LossScaling` for ``scale_loss``.
        found_inf_groups: where an inf in some shard is agreed; default the MPU's mp group (if
            initialized) and the model's DP group (together every rank: expert shards too).
        **optimizer_kwargs: passed to ``optimizer_cls`` (lr, betas, weight_decay, ...).
    ``self.optimizer`` is the inner optimizer (give it to an LR scheduler).
    """

    def __init__(self, model: DistributedDataParallel,
                 optimizer_cls: Type[torch.optim.Optimizer] = torch.optim.AdamW,
                 param_groups: list[dict[str, Any]] | None = None,
                 master_dtype: torch.dtype | None = None, *,
                 grad_scaler: DynamicGradScaler | None | str = "auto", found_inf_groups=None,
                 **optimizer_kwargs):
        if not getattr(model, "use_distributed_optimizer", False):
            raise ValueError("DistributedOptimizer needs the model wrapped as "
                             "DistributedDataParallel(module, use_distributed_optimizer=True): "
                             "its buckets must be reduce-scattered and own the parameters")
        self.model = model
        self.dp_rank = dist.get_rank(model.dp_group)
        if param_groups is None:
            param_groups = [{"params": list(model.bucketed_parameters())}]
        group_of = self._group_index(model, param_groups)
        # Before the check: a rank without a scaler would skip the found-inf all-reduce.
        self.grad_scaler = resolve_grad_scaler(grad_scaler, model.bucketed_parameters())
        self._check_ranks_agree(model, optimizer_cls, param_groups, group_of, master_dtype,
                                {**optimizer_kwargs, "grad_scaler": self.grad_scaler is not None})
        inner_groups = [{**group, "params": []} for group in param_groups]
        self.shards: list[Shard] = []
        for bucket in model.buckets:
            shard = self._make_shard(bucket, master_dtype)
            for param, master in shard.pieces:
                inner_groups[group_of[id(param)]]["params"].append(master)
            self.shards.append(shard)
        self.optimizer = optimizer_cls(inner_groups, **optimizer_kwargs)
        self._groups = found_inf_groups or default_found_inf_groups(model.dp_group)
        self._copied_round = -1  # the model's sync round whose gradients the masters hold

    def _make_shard(self, bucket: Bucket, master_dtype: torch.dtype | None) -> Shard:
        rank = dist.get_rank(bucket.group)
        start = rank * bucket.shard_numel
        model_dtype = bucket.param_data.dtype
        dtype = master_dtype or (torch.float32 if model_dtype in (torch.bfloat16, torch.float16)
                                 else model_dtype)
        master = bucket.param_data[start:start + bucket.shard_numel].to(dtype, copy=True)
        master_grad = (bucket.grad_shard if dtype == bucket.grad_shard.dtype
                       else torch.zeros_like(master))
        pieces, piece_grads = [], []
        for param, lo, hi in bucket.shard_pieces(rank):
            # A view of a tensor that does not require grad is a leaf: torch optimizers take it.
            piece = master[lo - start:hi - start]
            piece.grad = master_grad[lo - start:hi - start]
            pieces.append((param, piece))
            piece_grads.append(piece.grad)
        return Shard(bucket, start, master, master_grad, pieces, piece_grads)

    @staticmethod
    def _check_ranks_agree(model, optimizer_cls, param_groups, group_of, master_dtype,
                           optimizer_kwargs) -> None:
        """Each rank updates only its shard, so ranks given other options silently drift apart
        (checked over each group that shares shards: DP, and expert DP)."""
        entries = [("the optimizer", f"{optimizer_cls.__module__}.{optimizer_cls.__qualname__}, "
                                     f"master_dtype={master_dtype}, {_describe(optimizer_kwargs)}")]
        entries += [(f"param_groups[{i}]'s options",
                     _describe({k: v for k, v in group.items() if k != "params"}))
                    for i, group in enumerate(param_groups)]
        entries += [(f"the param group of {model._name(p)!r}", str(group_of[id(p)]))
                    for p in model.bucketed_parameters()]
        for group in model.reduction_groups:
            check_replicas_agree("DistributedOptimizer", entries, group,
                                 fix="every DP rank must build the optimizer with the same "
                                     "class, param groups and options")

    @staticmethod
    def _group_index(model: DistributedDataParallel, param_groups) -> dict[int, int]:
        group_of: dict[int, int] = {}
        for index, group in enumerate(param_groups):
            for param in group["params"]:
                if id(param) not in model._bucket_of:
                    raise ValueError(f"param_groups[{index}] holds a parameter of shape "
                                     f"{tuple(param.shape)} that the model does not synchronise")
                group_of[id(param)] = index
        missing = [model._name(p) for p in model.bucketed_parameters() if id(p) not in group_of]
        if missing:
            raise ValueError(f"parameters in no param group: {missing}")
        return group_of

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _master_grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(model parameter, master gradient)`` of every piece that has one. The gradients are
        copied (cast) from the reduce-scatter output, and unscaled, once per round, so that a
        clip before ``step`` is not overwritten or repeated."""
        self.model.check_grads_synced()
        if self._copied_round != self.model.sync_round:
            for shard in self.shards:
                if shard.master_grad is not shard.bucket.grad_shard:
                    shard.master_grad.copy_(shard.bucket.grad_shard)
                for (param, master), grad in zip(shard.pieces, shard.piece_grads):
                    master.grad = None if accumulated_grad(param) is None else grad
            # Every shard, padding included: an overflow can sit anywhere in the reduce-scatter.
            self._unscale([shard.master_grad for shard in self.shards], self._groups)
            self._copied_round = self.model.sync_round
        return [(param, master.grad) for shard in self.shards for param, master in shard.pieces
                if master.grad is not None]

    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0, *,
                       tp_group: dist.ProcessGroup | None = None,
                       mp_group: dist.ProcessGroup | None = None,
                       expert_mp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Clip the shards' gradients by the global norm; returns that norm (before clipping).

        The shards are disjoint, so their norm² is summed over the DP group as well as over
        the model-parallel group (MPU "mp" by default; TP-replicated parameters count once);
        expert shards' over the expert-DP group and the expert tp x ep x pp group
        (``expert_mp_group``, MPU "expert_tp_ep_pp" by default). Pass ``expert_mp_group`` on a
        pipeline stage without experts when other stages have some, so that it joins their sum.
        """
        pieces = self._master_grads()
        mp_group = mp_group if mp_group is not None else mpu.get_group("mp")
        expert_dp_group = self.model.expert_dp_group
        expert_groups = clip.expert_norm_groups(expert_dp_group is not None, expert_mp_group,
                                                expert_dp_group)
        return clip.clip_grads_([p for p, _ in pieces], [g for _, g in pieces], max_norm,
                                norm_type, tp_group=tp_group,
                                sum_groups=[mp_group, self.model.dp_group],
                                expert_sum_groups=expert_groups)

    @torch.no_grad()
    def step(self) -> bool:
        """Update this rank's shard, then all-gather every bucket's parameters in place. Returns
        False, leaving parameters and state alone on every rank, if some shard had an inf/nan
        (with a grad scaler)."""
        self._master_grads()
        self._update_scale()
        if self.found_inf:
            return False
        self.optimizer.step()
        handles = []
        for shard in self.shards:
            bucket = shard.bucket
            bucket.param_data[shard.start:shard.start + bucket.shard_numel].copy_(shard.master)
            handles.append(comm.all_gather_async_(bucket.param_data, bucket.group))
        for handle in handles:
            handle.wait()
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the model's gradient buckets (the masters' gradients are views or overwritten)."""
        self.model.zero_grad_buffer()

    def state_bytes(self) -> int:
        """Bytes of the inner optimizer's state tensors on this rank (Adam: two moments)."""
        return sum(value.numel() * value.element_size() for state in self.optimizer.state.values()
                   for value in state.values() if torch.is_tensor(value))


def _describe(options: dict[str, Any]) -> str:
    """Options as text that is equal on ranks given equal options (no object addresses)."""
    def text(value):
        if isinstance(value, (tuple, list)):
            return "(" + ", ".join(map(text, value)) + ")"
        if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
            return repr(value)
        if torch.is_tensor(value) and value.numel() == 1:
            return f"tensor({value.item()!r})"
        return type(value).__qualname__
    return "{" + ", ".join(f"{k}={text(v)}" for k, v in sorted(options.items())) + "}"
