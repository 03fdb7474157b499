"""Data parallelism with bucketed gradients whose collectives overlap the backward pass.

    model = DistributedDataParallel(model)           # groups from the MPU
    for step in ...:
        for i, micro_batch in enumerate(micro_batches):
            with model.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
                loss_fn(model(micro_batch)).backward()
        model.finish_grad_sync()                      # waits; gradients are now averaged
        optimizer.step()
        model.zero_grad_buffer()

What happens in backward: a post-accumulate-grad hook on every parameter marks its gradient
ready; when every gradient of a bucket is ready the bucket's all-reduce (reduce-scatter with the
distributed optimizer) starts asynchronously while autograd goes on with earlier layers. Buckets
start strictly in bucket order, as torch DDP's reducer does, so every rank issues the same
collectives in the same order even when a gradient arrives on some ranks and not on others.
``finish_grad_sync`` starts whatever did not start (buckets holding unused parameters, or all of
them with ``overlap_grad_reduce=False``) and waits for everything.

Unused parameters, as torch DDP with ``find_unused_parameters=True`` (or ``static_graph``) treats
them: a parameter that got no gradient on this rank contributes zeros, so one used on some ranks
gets the average over all of them; one that got no gradient on any rank is left with
``.grad = None`` (an optimizer then skips it: no weight decay, no moment update). Knowing "on any
rank" costs one tiny all-reduce (MAX) of a per-parameter used-mask per step and group (expert
parameters: "on any rank of the expert-DP group"), in ``finish_grad_sync``.

Wrapping checks that every rank of the group holds the same model (names, shapes, dtypes, order)
with one all-gather of a fixed-size digest, and raises a ValueError naming the first difference on
every rank, where a mismatch would otherwise abort the process at the first bucket's collective.
Then, as torch DDP does, every parameter is broadcast from the group's first rank (``init_sync``),
so replicas start identical even if they were initialised with different seeds.

Averaging group: DP x CP when the MPU has cp > 1 (CP ranks see other tokens of the same samples,
so their gradients are partial too), DP otherwise. Gradients are scaled by 1/size before the sum:
gloo has no AVG, and a pre-scaled fp16/bf16 sum stays in range.

Expert parallelism: parameters marked ``expert_parallel`` (a rank's share of the MoE experts) sit
in buckets of their own, summed over the expert-DP group (the MPU's ``expert_dp``: the ranks
holding the same expert shard), and broadcast over it at wrap time. They are scaled by 1 / the
*dense* group's size, as Megatron's ``expert_gradient_scaling_factor`` is: each dense replica saw
1/dp of the tokens, while the expert-DP replicas of a shard together saw every token once (each
one those of its EP group), so sum / dp is the gradient of the same loss as the dense ones'. With
ZeRO the expert buckets are sharded over expert DP.

Mixed precision (``precision.py``): with bf16/fp16 parameters the buckets are fp32 by default
(``grad_dtype``), so micro-batches accumulate and the DP reduction runs in fp32 (or in bf16 on
request: ``reduce_dtype``). Every parameter then has ``param.main_grad``, an fp32 view into its
bucket; the hook adds each backward's half-precision ``param.grad`` into it and sets ``.grad`` to
None. The rules above hold for ``main_grad`` as they do for ``.grad``: after
``finish_grad_sync`` it is the average, or None for a parameter no rank computed a gradient for
(optimizers skip it), and ``zero_grad_buffer`` restores and zeroes the view. It accumulates until
then, as ``.grad`` does. Step with
:class:`~parallelkit.data_parallel.mixed_precision.MixedPrecisionOptimizer` (fp32 masters) or
:class:`~parallelkit.data_parallel.zero.DistributedOptimizer`; a torch optimizer given the bf16
parameters would see no ``.grad``.

Sequence parallelism: parameters marked ``sequence_parallel`` (norms, biases after a row-parallel
reduce-scatter) hold a partial gradient on each TP rank. The wrapper sums them over TP itself,
in the bucket holding them, just before that bucket's DP collective starts (one flat all-reduce
per bucket, after the last micro-batch only). So do not also call
``tensor_parallel.sync_sequence_parallel_grads`` or register its hooks, or pass
``sync_sequence_parallel=False`` if you do.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.data_parallel.buckets import (DEFAULT_BUCKET_BYTES, Bucket,
                                               broadcast_from_first_rank_, check_replicas_agree,
                                               describe_tensor, is_expert_parallel, plan_buckets,
                                               unsyncable_parameter)
from parallelkit.data_parallel.precision import (bucket_grad_dtype, bucket_reduce_dtype,
                                                 precision_error, refuse_plain_optimizers,
                                                 start_reduction)
from parallelkit.distributed import comm, mpu
from parallelkit.distributed.groups import resolve_group
from parallelkit.tensor_parallel.sequence_parallel import (is_reduced_in_backward,
                                                           is_sequence_parallel)


def default_dp_group() -> dist.ProcessGroup:
    """The MPU's gradient-averaging group: DP x CP when cp > 1, else DP."""
    return mpu.get_dp_group(with_context_parallel=mpu.get_cp_world_size() > 1)


def resolve_expert_dp_group(module: nn.Module,
                            group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """Where ``module``'s expert-parallel parameters are reduced: ``group`` if given, else the
    MPU's expert-DP group; None for a model without any (a clear error if it has some and no
    group is to be had)."""
    name = next((n for n, p in module.named_parameters() if is_expert_parallel(p)), None)
    if name is None or group is not None:
        return group if name is not None else None
    try:
        return mpu.current().info("expert_dp").group
    except ValueError as error:
        raise ValueError(f"parameter {name!r} is expert-parallel (its gradient is reduced over "
                         f"the expert-data-parallel group), but there is no such group: "
                         f"{error}; or pass expert_dp_group= explicitly") from error


class DistributedDataParallel(nn.Module):
    """Wraps ``module``; its trainable parameters' gradients become views into flat buckets.

    Args:
        module: the model, or this pipeline stage's part of it. Existing ``.grad`` are dropped.
        dp_group: the group gradients are averaged over; default :func:`default_dp_group`.
        expert_dp_group: the group expert-parallel parameters' gradients are reduced over;
            default the MPU's expert-DP group (looked up only if the model has such parameters).
        bucket_bytes: target bucket size in bytes (> 0); a bucket closes once it is reached.
        overlap_grad_reduce: start each bucket's collective from backward as soon as it is
            complete (True), or all of them in ``finish_grad_sync`` (False: sync after backward).
        use_distributed_optimizer: reduce-scatter instead of all-reduce, buckets padded to a
            multiple of the DP size and owning the parameters' storage, as
            :class:`~parallelkit.data_parallel.zero.DistributedOptimizer` needs.
        tp_group: where sequence-parallel gradients are summed; default the MPU's TP group
            (looked up only if some parameter is marked ``sequence_parallel``).
        sync_sequence_parallel: False if the caller already reduces those gradients over TP.
        init_sync: broadcast every parameter from the group's first rank at wrap time (torch
            DDP's default and name), so that the replicas start identical. Buffers are left
            alone: with CP they may rightly differ between the group's ranks.
        grad_dtype: for bf16/fp16 parameters, torch.float32 (the default: fp32 ``main_grad``
            buckets) or their own dtype (``.grad`` views, as for fp32 models). Other parameters'
            gradients always keep their dtype.
        reduce_dtype: None (each bucket reduces in its own dtype) or the half dtype of the
            parameters whose fp32 main grads are cast down for the collective and back after it.
    Raises ValueError, on every rank of the group, if the ranks' models differ (parameter
    names, shapes, dtypes, order), a parameter is where a bucket cannot sync it, or
    ``grad_dtype``/``reduce_dtype`` make no sense for the model; and if the model has expert
    parameters but no expert-DP group is given or in the MPU.
    """

    def __init__(self, module: nn.Module, dp_group: dist.ProcessGroup | None = None, *,
                 expert_dp_group: dist.ProcessGroup | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap_grad_reduce: bool = True,
                 use_distributed_optimizer: bool = False,
                 tp_group: dist.ProcessGroup | None = None, sync_sequence_parallel: bool = True,
                 init_sync: bool = True, grad_dtype: torch.dtype | None = None,
                 reduce_dtype: torch.dtype | None = None):
        super().__init__()
        plans = plan_buckets([p for p in module.parameters() if p.requires_grad], bucket_bytes)
        self.module = module
        self.dp_group = dp_group if dp_group is not None else default_dp_group()
        self.dp_size = dist.get_world_size(self.dp_group)
        self.expert_dp_group = resolve_expert_dp_group(module, expert_dp_group)
        self._check_replicas_agree(f"bucket_bytes={bucket_bytes}, "
                                   f"use_distributed_optimizer={use_distributed_optimizer}, "
                                   f"grad_dtype={grad_dtype}, reduce_dtype={reduce_dtype}",
                                   precision_error(module, grad_dtype, reduce_dtype))
        for group in self.reduction_groups if init_sync else []:
            if dist.get_world_size(group) > 1:
                broadcast_from_first_rank_([p for p in module.parameters()
                                            if self._group_of(p) is group], group, bucket_bytes)
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.buckets = []
        for i, params in enumerate(plans):
            group = self._group_of(params[0])
            shards = dist.get_world_size(group) if use_distributed_optimizer else 1
            self.buckets.append(Bucket.create(
                i, params, shards, own_params=use_distributed_optimizer,
                grad_dtype=bucket_grad_dtype(params[0].dtype, grad_dtype), group=group))
        self._reduce_dtypes = [bucket_reduce_dtype(b.grad_data, b.param_dtype, reduce_dtype)
                               for b in self.buckets]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._names = {id(p): name for name, p in module.named_parameters()}
        # Per bucket, its sequence-parallel parameters (summed over TP before the DP collective),
        # unless a hook already summed them in backward (parallelize registers those).
        self._sp_params = [[p for p in b.params if is_sequence_parallel(p)
                            and not is_reduced_in_backward(p)] for b in self.buckets]
        self.tp_group = None
        if sync_sequence_parallel and any(self._sp_params):
            self.tp_group = resolve_group(tp_group, "tp")
        self._sync_enabled = True
        self._pending = False  # a forward or a gradient since the last sync: finish must sync
        self._arrived: set[int] = set()  # parameters that got a gradient since the last sync
        self._next_bucket = 0  # buckets below this index have started their collective
        self.unused_parameters: list[str] = []  # no gradient in the last synchronised round
        self.sync_round = 0  # counts finish_grad_sync()s that synced and zero_grad_buffer()s
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_accumulated)
                       for b in self.buckets for p in b.params]
        refuse_plain_optimizers(self)

    @property
    def reduction_groups(self) -> list[dist.ProcessGroup]:
        """The distinct groups buckets are reduced over: the DP group, then the expert-DP group
        if the model has expert parameters (and it is another group)."""
        groups = [self.dp_group]
        if self.expert_dp_group is not None and self.expert_dp_group is not self.dp_group:
            groups.append(self.expert_dp_group)
        return groups

    def _group_of(self, param: nn.Parameter) -> dist.ProcessGroup:
        return self.expert_dp_group if is_expert_parallel(param) else self.dp_group

    def _check_replicas_agree(self, options: str, precision: str | None) -> None:
        """Every rank of each group must build the same buckets (else the first collective
        aborts the process): same options, same parameters in the same order. The expert-DP
        group need not lie inside the DP group (etp != tp), so it is checked on its own."""
        def describe(p):
            return (describe_tensor(p) + ("" if p.requires_grad else " frozen")
                    + (" expert" if is_expert_parallel(p) else ""))
        named = list(self.module.named_parameters())
        for group in self.reduction_groups:
            entries = [("the wrapper's options", options)] + [
                (f"parameter {name!r}", describe(p)) for name, p in named
                if group is self.dp_group or self._group_of(p) is group]
            check_replicas_agree("DistributedDataParallel", entries, group,
                                 local_error=unsyncable_parameter(self.module, group)
                                 or precision,
                                 fix="every DP replica must hold the same model: build it "
                                     "identically on every rank (same config, same parallel "
                                     "sizes) before wrapping it")

    def forward(self, *args, **kwargs):
        # Every rank runs forward, so this (unlike a gradient, which some rank may not get at
        # all) tells each of them alike that finish_grad_sync() has collectives to join.
        self._pending = self._pending or torch.is_grad_enabled()
        return self.module(*args, **kwargs)

    def bucketed_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters this wrapper synchronises, in bucket order (last layer first)."""
        for bucket in self.buckets:
            yield from bucket.params

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally: no collective for the backward passes inside the block.
        Use it for every micro-batch but the last, whose backward then syncs the sum."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def finish_grad_sync(self) -> None:
        """Start the collectives that have not started, wait for all of them.

        Afterwards every ``param.main_grad`` (and ``param.grad`` where it is the same view)
        is the average over the DP group (an expert parameter's: the sum over the expert-DP group
        / the DP size; with the distributed optimizer: each bucket's ``grad_shard`` is this
        rank's averaged shard, and the views only this rank's own gradient / size), except that a
        parameter no rank of its group computed a gradient for has ``.main_grad = None`` (and
        ``.grad = None``). A no-op when neither a forward through this wrapper nor a gradient
        happened since the last call.
        """
        if not self._sync_enabled:
            raise RuntimeError("finish_grad_sync() was called inside no_sync(): call it after "
                               "the last micro-batch's backward, outside the no_sync() block")
        if not (self._pending or self._arrived or self._next_bucket):
            return
        self._start_in_order(complete_only=False)  # buckets with unused parameters, or no overlap
        used_anywhere = self._used_on_any_rank()
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None
            bucket.ready.clear()
        for param, used in zip(self.bucketed_parameters(), used_anywhere):
            # torch DDP's rule for a locally unused one: the average if some rank used it (.grad
            # may be None after set_to_none), else no gradient (zero_grad_buffer() restores it)
            bucket = self._bucket_of[id(param)]
            param.main_grad = bucket.grad_view(param) if used else None
            if id(param) not in self._arrived and not bucket.holds_main_grads:
                param.grad = param.main_grad
        self.unused_parameters = [self._name(p) for p in self.bucketed_parameters()
                                  if id(p) not in self._arrived]
        self._arrived.clear()
        self._pending = False
        self._next_bucket = 0
        self.sync_round += 1

    def _used_on_any_rank(self) -> list[bool]:
        """Per parameter (bucket order), whether some rank of its group computed a gradient:
        one all-reduce per group (the DP group; the expert-DP group for expert parameters)."""
        params = list(self.bucketed_parameters())
        used = [id(p) in self._arrived for p in params]
        for group in self.reduction_groups:
            positions = [i for i, p in enumerate(params) if self._group_of(p) is group]
            if dist.get_world_size(group) == 1 or not positions:
                continue
            local = [used[i] for i in positions]
            mask = torch.tensor(local, dtype=torch.uint8).to(self.buckets[0].grad_data.device)
            everywhere = comm.all_reduce(mask, group, op="max")
            # Used here is used somewhere: such a rank joins the collective, need not wait on it.
            if not all(local):
                for i, value in zip(positions, everywhere.tolist()):
                    used[i] = bool(value)
        return used

    def check_grads_synced(self) -> None:
        """Raise unless every gradient that arrived has been synchronised (before a step)."""
        if self._arrived or self._next_bucket:
            raise RuntimeError("the gradients are not synchronised across data-parallel ranks: "
                               "call finish_grad_sync() after the last micro-batch's backward "
                               "and before optimizer.step()")

    def guard_optimizer(self, optimizer: torch.optim.Optimizer):
        """Make ``optimizer.step()`` raise if called before ``finish_grad_sync()``; returns the
        hook handle."""
        return optimizer.register_step_pre_hook(lambda *_: self.check_grads_synced())

    def zero_grad_buffer(self) -> None:
        """Zero every bucket and point each ``param.main_grad`` (and ``param.grad`` unless the
        bucket holds main grads) back at its view (also undoing an optimizer's
        ``zero_grad(set_to_none=True)``)."""
        if self._next_bucket:
            raise RuntimeError("zero_grad_buffer() while collectives are in flight: call "
                               "finish_grad_sync() first")
        for bucket in self.buckets:
            bucket.grad_data.zero_()
            if bucket.grad_shard is not None:
                bucket.grad_shard.zero_()
            bucket.ready.clear()
            for param in bucket.params:
                bucket.point_grads_at_buffer(param)
        self._arrived.clear()
        self.sync_round += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the buckets whatever ``set_to_none`` says: the gradients must stay views."""
        self.zero_grad_buffer()

    def _on_grad_accumulated(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[id(param)]
        self._check_still_bucketable(param, bucket)
        if bucket.handle is not None:
            raise RuntimeError(f"a gradient of {self._name(param)} arrived while its bucket's "
                               "collective is in flight: call finish_grad_sync() after the last "
                               "micro-batch's backward, before the next backward")
        view = bucket.grad_view(param)
        if bucket.holds_main_grads:
            # Accumulate in fp32, and free the half-precision gradient: the next micro-batch's
            # then arrives in a fresh tensor, which autograd hands over without a copy.
            view.add_(param.grad)
            param.grad = None
        elif param.grad.data_ptr() != view.data_ptr():
            # Someone replaced .grad (zero_grad(set_to_none=True), create_graph): param.grad then
            # holds the whole accumulated gradient, so copy it in rather than add.
            view.copy_(param.grad)
            param.grad = view
        self._arrived.add(id(param))
        self._pending = True
        if not self._sync_enabled:
            return
        if id(param) in bucket.ready:
            raise RuntimeError(f"{self._name(param)} got a second gradient in one synchronised "
                               "round: run every micro-batch but the last under no_sync(), and "
                               "call finish_grad_sync() after the last")
        bucket.ready.add(id(param))
        if self.overlap_grad_reduce:
            self._start_in_order(complete_only=True)

    def _start_in_order(self, complete_only: bool) -> None:
        """Start buckets strictly in index order, the same on every rank whatever order their
        gradients arrived in; with ``complete_only``, stop at the first incomplete bucket."""
        while self._next_bucket < len(self.buckets):
            bucket = self.buckets[self._next_bucket]
            if complete_only and len(bucket.ready) < len(bucket.params):
                return
            self._start(bucket)
            self._next_bucket += 1

    def _check_still_bucketable(self, param: nn.Parameter, bucket: Bucket) -> None:
        flat = bucket.grad_data
        if param.grad.is_sparse:
            raise RuntimeError(f"{self._name(param)} got a sparse gradient, which a gradient "
                               "bucket cannot hold: build its module with sparse=False")
        if param.dtype != bucket.param_dtype or param.device != flat.device:
            raise RuntimeError(f"{self._name(param)} is {param.dtype} on {param.device}, but its "
                               f"gradient bucket was built for {bucket.param_dtype} on "
                               f"{flat.device}: the model was converted or moved after wrapping; "
                               "call model.to(...) before DistributedDataParallel(model), not "
                               "after")

    def _start(self, bucket: Bucket) -> None:
        """Sum the bucket's sequence-parallel gradients over TP, then start its DP collective."""
        if len(bucket.ready) < len(bucket.params):
            # A parameter without a gradient on this rank contributes zero (torch DDP's rule),
            # not what an optimizer's zero_grad(set_to_none=True) left in its slot.
            for param in bucket.params:
                if id(param) not in self._arrived:
                    bucket.grad_view(param).zero_()
        sp_params = self._sp_params[bucket.index]
        if sp_params and self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            views = [bucket.grad_view(p) for p in sp_params]
            summed = comm.all_reduce(torch._utils._flatten_dense_tensors(views), self.tp_group)
            for view, total in zip(views, torch._utils._unflatten_dense_tensors(summed, views)):
                view.copy_(total)
        if self.dp_size > 1:
            # 1 / the dense size for expert buckets too (see the module docstring)
            bucket.grad_data.mul_(1.0 / self.dp_size)
        bucket.handle = start_reduction(bucket.grad_data, bucket.grad_shard,
                                        self._reduce_dtypes[bucket.index], bucket.group)

    def _name(self, param: nn.Parameter) -> str:
        return self._names.get(id(param), f"a parameter of shape {tuple(param.shape)}")

