"""What precision a gradient bucket accumulates and reduces in: the dtype policy of
:class:`~parallelkit.data_parallel.ddp.DistributedDataParallel`'s ``grad_dtype`` and
``reduce_dtype``, the collective that reduces a bucket in a narrower dtype, and the guard that
makes a plain torch optimizer given parameters with fp32 main grads raise.

``grad_dtype`` only concerns bf16/fp16 parameters (every other parameter's gradient keeps the
parameter's dtype: a bucket never holds less precision than its parameters):

- float32 (the default for them, Megatron's ``accumulate_allreduce_grads_in_fp32``): the bucket
  is fp32 and holds *main grads*; ``param.main_grad`` is the fp32 view, ``param.grad`` (bf16) is
  added into it and freed by the post-accumulate-grad hook, so micro-batches sum in fp32.
- the parameters' own dtype: the bucket is bf16/fp16 and ``param.grad`` is the view, as for fp32
  models (half the memory; each micro-batch's addition rounds to 8 or 11 bits).

``reduce_dtype``: None reduces each bucket in its own dtype. The half dtype of the parameters
whose main grads a bucket holds (``torch.bfloat16`` for a bf16 model) casts those buckets down
for the collective and back to fp32 after it: half the bytes on the wire, the sum rounded once
per rank. Any other value would widen a bucket (set ``grad_dtype`` instead) or narrow gradients
that have no half-precision parameter behind them, so it is refused.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from parallelkit.distributed import comm

HALF_DTYPES = (torch.bfloat16, torch.float16)


def bucket_grad_dtype(param_dtype: torch.dtype, grad_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the gradient bucket of parameters of ``param_dtype``: float32 for bf16/fp16
    unless ``grad_dtype`` is their own dtype; the parameters' dtype for every other dtype."""
    if param_dtype not in HALF_DTYPES:
        return param_dtype
    return param_dtype if grad_dtype == param_dtype else torch.float32


def precision_error(module: nn.Module, grad_dtype, reduce_dtype) -> str | None:
    """Why ``grad_dtype``/``reduce_dtype`` make no sense for ``module``, or None (a message for
    ``check_replicas_agree``, so that every rank raises it)."""
    half = {p.dtype for p in module.parameters() if p.requires_grad and p.dtype in HALF_DTYPES}
    names = ", ".join(sorted(str(d) for d in half)) or "none"
    for option, value in (("grad_dtype", grad_dtype), ("reduce_dtype", reduce_dtype)):
        if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
            return (f"{option}={value!r} is not a floating-point torch.dtype: pass None, "
                    "torch.float32 or torch.bfloat16/torch.float16")
    if grad_dtype is not None and grad_dtype != torch.float32:
        if grad_dtype not in HALF_DTYPES or half != {grad_dtype}:
            return (f"grad_dtype={grad_dtype} concerns the bf16/fp16 parameters only (the model's "
                    f"trainable ones: {names}); it must be torch.float32 (fp32 main grads, the "
                    "default) or their own dtype (accumulate and reduce in it); every other "
                    "parameter's gradient keeps its parameter's dtype")
    main = half if grad_dtype in (None, torch.float32) else set()
    grads = {bucket_grad_dtype(p.dtype, grad_dtype) for p in module.parameters() if p.requires_grad}
    if reduce_dtype is None or reduce_dtype in main or grads == {reduce_dtype}:
        return None  # casts main grads down, or is the one dtype the buckets reduce in anyway
    if reduce_dtype in HALF_DTYPES:
        return (f"reduce_dtype={reduce_dtype} casts the fp32 main grads of {reduce_dtype} "
                f"parameters down for the collective, but no bucket holds such main grads "
                f"(trainable half-precision parameters: {names}; grad_dtype={grad_dtype}): "
                "drop reduce_dtype, each bucket is then reduced in its own dtype")
    held = ", ".join(sorted(str(d) for d in grads))
    return (f"reduce_dtype={reduce_dtype} is neither the dtype the gradients accumulate in "
            f"({held}) nor that of bf16/fp16 parameters whose fp32 main grads it could cast "
            "down: drop it (each bucket is then reduced in its own dtype), or pass "
            "grad_dtype=torch.float32 to accumulate and reduce bf16/fp16 gradients in fp32")


def bucket_reduce_dtype(grad_data: torch.Tensor, param_dtype: torch.dtype,
                        reduce_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a bucket's collective runs in (see the module docstring)."""
    holds_main_grads = grad_data.dtype != param_dtype
    return reduce_dtype if holds_main_grads and reduce_dtype == param_dtype else grad_data.dtype


class CastBackHandle:
    """A collective that runs on a narrower copy; ``wait()`` then copies the result into the
    bucket's own buffer (``into``) and returns it."""

    def __init__(self, handle: comm.Handle, into: torch.Tensor):
        self._handle, self._into = handle, into

    def wait(self) -> torch.Tensor:
        result = self._handle.wait()
        if result is not self._into:
            self._into.copy_(result)
            self._handle = comm.Handle(None, self._into)
        return self._into


def start_reduction(grad_data: torch.Tensor, grad_shard: torch.Tensor | None,
                    dtype: torch.dtype, group: dist.ProcessGroup):
    """Start summing ``grad_data`` [n] over ``group`` in ``dtype``: all-reduce in place, or
    reduce-scatter into ``grad_shard`` [n/p] when it is given. Returns a handle whose ``wait()``
    leaves the result in the bucket's own buffer, in its own dtype."""
    if dtype == grad_data.dtype:
        if grad_shard is None:
            return comm.all_reduce_async_(grad_data, group)
        return comm.reduce_scatter_async(grad_data, grad_shard, group)
    sent = grad_data.to(dtype)
    if grad_shard is None:
        return CastBackHandle(comm.all_reduce_async_(sent, group), grad_data)
    out = torch.empty(grad_shard.shape, dtype=dtype, device=grad_shard.device)
    return CastBackHandle(comm.reduce_scatter_async(sent, out, group), grad_shard)


def refuse_plain_optimizers(ddp) -> None:
    """A torch optimizer stepping half-precision parameters whose gradients live in fp32
    ``main_grad`` buckets would see ``.grad = None`` and silently do nothing: make its step raise
    (a global optimizer step pre-hook, removed when the wrapper ``ddp``, a
    :class:`~parallelkit.data_parallel.ddp.DistributedDataParallel`, is collected). The
    optimizers that read ``main_grad`` step fp32 master copies, never these parameters."""
    held = {id(p) for b in ddp.buckets if b.holds_main_grads for p in b.params}
    if not held:
        return
    wrapper = weakref.ref(ddp)

    def check(optimizer, args, kwargs):
        if wrapper() is None:
            return
        for group in optimizer.param_groups:
            if any(id(p) in held for p in group["params"]):
                raise RuntimeError(
                    f"{type(optimizer).__name__} steps bf16/fp16 parameters whose gradients "
                    "DistributedDataParallel accumulates in fp32 param.main_grad (their .grad is "
                    "None): use parallelkit.data_parallel.MixedPrecisionOptimizer (fp32 master "
                    "weights) or DistributedOptimizer, or wrap with grad_dtype=<the parameters' "
                    "dtype> to keep half-precision .grad")

    handle = register_optimizer_step_pre_hook(check)
    weakref.finalize(ddp, handle.remove)
