"""Gradient clipping by the global norm of the whole model, whatever its layout.

The norm a single process would compute over the full model's gradients is assembled from the
pieces each rank holds:

- TP: a sharded parameter's gradient is split across TP ranks, so the shards' norm² is summed
  over TP. A TP-replicated parameter (``tp_shard_dim`` missing or None: norms, row-parallel
  biases, sequence-parallel parameters once synced) is the same on every TP rank, so only TP
  rank 0 counts it.
- PP: each stage holds other layers: summed over PP. TP and PP together are the MPU's "mp" group.
- DP (and CP): after an all-reduce every replica holds the same averaged gradient, so replicas
  are not summed. With the distributed optimizer each DP rank holds a disjoint shard instead, so
  the shards are summed over the DP (x CP) group too (:meth:`DistributedOptimizer.clip_grad_norm`).
- Experts (parameters marked ``expert_parallel``): every rank of the expert tp x ep x pp group
  holds other experts or other shards of them, and the expert-DP replicas the same synced
  gradient, so their part is summed over that group (the MPU's "expert_tp_ep_pp"), and with the
  distributed optimizer over expert DP too. As Megatron's chained optimizer does, the total is
  (dense part + expert part) ** (1/p): each parameter counted once.

A parameter held by two pipeline stages (tied input/output embeddings) must be passed on one of
them only, or it is counted twice.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.data_parallel.buckets import accumulated_grad, is_expert_parallel
from parallelkit.distributed import comm, mpu


def is_tp_replicated(param: torch.Tensor) -> bool:
    """Whether ``param`` is whole on every TP rank (not a shard of a larger tensor)."""
    return getattr(param, "tp_shard_dim", None) is None


def default_expert_mp_group() -> dist.ProcessGroup:
    """The MPU's expert tp x ep x pp group: one copy of every expert weight, each rank a part."""
    try:
        return mpu.current().info("expert_tp_ep_pp").group
    except ValueError as error:
        raise ValueError(f"expert-parallel parameters are counted once in the global norm by "
                         f"summing over the expert tp x ep x pp group, but there is none: "
                         f"{error}; or pass expert_mp_group= explicitly") from error


def expert_norm_groups(has_experts: bool, expert_mp_group: dist.ProcessGroup | None = None,
                       expert_dp_group: dist.ProcessGroup | None = None):
    """Where the expert part of the norm is summed: ``[expert_mp_group`` (default the MPU's)
    ``, expert_dp_group]`` (ZeRO shards: the expert-DP group, if given); None (no expert part,
    no collective) when the model has no expert parameters and no group is passed."""
    if not has_experts and expert_mp_group is None:
        return None
    groups = [expert_mp_group if expert_mp_group is not None else default_expert_mp_group()]
    return groups + ([expert_dp_group] if expert_dp_group is not None else [])


def global_grad_norm(grads: list[torch.Tensor], replicated: list[bool], norm_type: float = 2.0,
                     *, tp_group: dist.ProcessGroup | None = None,
                     sum_groups: list[dist.ProcessGroup] | None = None,
                     expert_grads: list[torch.Tensor] | None = None,
                     expert_sum_groups: list[dist.ProcessGroup] | None = None) -> torch.Tensor:
    """The ``norm_type``-norm of all the model's gradients, the same on every rank.

    Args:
        grads: this rank's gradient tensors (any shapes) of dense parameters.
        replicated: per gradient, whether its parameter is TP-replicated (counted on TP rank 0).
        tp_group: decides "TP rank 0"; default the MPU's TP group.
        sum_groups: the groups over which the local pieces are combined; default ``[mp]``.
        expert_grads: None (no expert part: no collective for it), or this rank's gradients of
            expert-parallel parameters, each counted (none is replicated within the groups).
        expert_sum_groups: where those are combined; default ``[expert_tp_ep_pp]``. Every rank
            of these groups must pass a list (perhaps empty), or the others wait for it.
    Returns a 0-d float64 tensor. Each gradient's norm is computed in float32 (float64 for
    float64 gradients); the partial sums are float64 so that every rank, even one holding no
    gradient (a ZeRO shard of padding), enters the collectives with the same dtype.
    """
    _check_norm_type(norm_type)
    tp_group = tp_group if tp_group is not None else mpu.get_tp_group()
    sum_groups = sum_groups if sum_groups is not None else [mpu.get_group("mp")]
    first_tp_rank = dist.get_rank(tp_group) == 0
    counted = [g.detach() for g, rep in zip(grads, replicated) if first_tp_rank or not rep]
    device = _device(list(grads) + list(expert_grads or []), sum_groups[0])
    total = _reduced_norm_part(counted, norm_type, sum_groups, device)
    if expert_grads is not None:
        if expert_sum_groups is None:
            expert_sum_groups = [default_expert_mp_group()]
        expert = _reduced_norm_part([g.detach() for g in expert_grads], norm_type,
                                    expert_sum_groups, device)
        total = torch.maximum(total, expert) if math.isinf(norm_type) else total + expert
    return total if math.isinf(norm_type) else total ** (1.0 / norm_type)


def _reduced_norm_part(grads: list[torch.Tensor], norm_type: float,
                       groups: list[dist.ProcessGroup], device: torch.device) -> torch.Tensor:
    """max |g| (inf) or sum |g|^p of ``grads`` over ``groups``: a 0-d float64 tensor."""
    local = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        norm = torch.linalg.vector_norm(grad, norm_type, dtype=dtype).double()
        # inf: the largest |g|; p: sum |g|^p, so that the pieces on other ranks simply add
        local = torch.maximum(local, norm) if math.isinf(norm_type) else local + norm ** norm_type
    for group in groups:
        local = comm.all_reduce(local, group, op="max" if math.isinf(norm_type) else "sum")
    return local


def scale_grads_(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Multiply ``grads`` in place by ``min(1, max_norm / (total_norm + 1e-6))`` (torch's rule).

    Always multiplies (by 1.0 when under the limit, which is exact) so that on a GPU no value is
    read back to the host to decide.
    """
    coefficient = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for dtype, same in by_dtype.items():
        torch._foreach_mul_(same, coefficient.to(dtype))


def clip_grads_(params: list[torch.Tensor], grads: list[torch.Tensor], max_norm: float,
                norm_type: float = 2.0, *, tp_group: dist.ProcessGroup | None = None,
                sum_groups: list[dist.ProcessGroup] | None = None,
                expert_sum_groups: list[dist.ProcessGroup] | None = None) -> torch.Tensor:
    """Clip ``grads`` (those of ``params``, in order: their TP layout decides what is counted
    once) in place by their global norm; returns it. Dense parameters' part is summed over
    ``sum_groups`` (default ``[mp]``), expert-parallel ones' over ``expert_sum_groups`` (default
    ``[expert_tp_ep_pp]``), which runs when it is given or some parameter is an expert one."""
    dense = [(p, g) for p, g in zip(params, grads) if not is_expert_parallel(p)]
    expert = [g for p, g in zip(params, grads) if is_expert_parallel(p)]
    total = global_grad_norm([g for _, g in dense], [is_tp_replicated(p) for p, _ in dense],
                             norm_type, tp_group=tp_group, sum_groups=sum_groups,
                             expert_grads=expert if expert or expert_sum_groups else None,
                             expert_sum_groups=expert_sum_groups)
    scale_grads_(grads, max_norm, total)
    return total


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0,
                    *, tp_group: dist.ProcessGroup | None = None,
                    mp_group: dist.ProcessGroup | None = None,
                    expert_mp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model split over TP and PP and replicated over DP.

    ``parameters``: this rank's parameters (this pipeline stage's, TP shards), with gradients
    already averaged over DP (after ``finish_grad_sync``). What is clipped is each parameter's
    fp32 ``main_grad`` where the DP wrapper gave it one, else its ``.grad``
    (:func:`~parallelkit.data_parallel.buckets.accumulated_grad`). With fp16 loss scaling, clip
    through the optimizer's ``clip_grad_norm``, which unscales first. Groups default to the MPU's
    TP and mp. Expert-parallel parameters (after the expert-DP sync) are summed over
    ``expert_mp_group`` (default the MPU's expert tp x ep x pp group); a pipeline stage without
    any, in a model whose other stages have some, must pass it to join their sum. Returns the
    global norm (before clipping), equal on every rank.
    """
    params = list(parameters)
    expert_groups = expert_norm_groups(any(is_expert_parallel(p) for p in params),
                                       expert_mp_group)
    pairs = [(p, accumulated_grad(p)) for p in params]
    pairs = [(p, g) for p, g in pairs if g is not None]
    mp_group = mp_group if mp_group is not None else mpu.get_group("mp")
    return clip_grads_([p for p, _ in pairs], [g for _, g in pairs], max_norm, norm_type,
                       tp_group=tp_group, sum_groups=[mp_group], expert_sum_groups=expert_groups)


def _device(grads: list[torch.Tensor], group: dist.ProcessGroup) -> torch.device:
    if grads:
        return grads[0].device
    return torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _check_norm_type(norm_type: float) -> None:
    if not norm_type > 0:  # also rejects nan
        raise ValueError(f"norm_type={norm_type!r} must be a positive number or inf")
