"""Gradients of parameters replicated across TP ranks but applied to a sequence shard.

Under sequence parallelism a LayerNorm (or the bias added after a row-parallel reduce-scatter)
sees only this rank's ``s/tp`` tokens, so its gradient on each TP rank is a partial sum: the true
gradient is the sum over the TP group. Mark such parameters, then either call
:func:`sync_sequence_parallel_grads` after backward (one flat all-reduce) or register
:func:`register_sequence_parallel_grad_hooks` once (each gradient is reduced as autograd produces
it, before it is accumulated, so gradient accumulation stays correct).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.distributed import comm


def mark_sequence_parallel(*params: torch.Tensor) -> None:
    for param in params:
        param.sequence_parallel = True


def is_sequence_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "sequence_parallel", False)


def is_reduced_in_backward(param: torch.Tensor) -> bool:
    """Whether a hook already sums this parameter's gradient over TP during backward."""
    return getattr(param, "sequence_parallel_hooked", False)


def sequence_parallel_params(module: nn.Module) -> list[nn.Parameter]:
    """Marked parameters whose gradients still need the sum over TP (hooked ones have it)."""
    return [p for p in module.parameters() if p.requires_grad and is_sequence_parallel(p)
            and not is_reduced_in_backward(p)]


def sync_sequence_parallel_grads(module: nn.Module, tp_group: dist.ProcessGroup) -> None:
    """All-reduce (sum) over TP the gradients of ``module``'s marked parameters, in one call."""
    grads = [p.grad for p in sequence_parallel_params(module) if p.grad is not None]
    if not grads or dist.get_world_size(tp_group) == 1:
        return
    flat = comm.all_reduce(torch._utils._flatten_dense_tensors(grads), tp_group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def register_sequence_parallel_grad_hooks(module: nn.Module, tp_group: dist.ProcessGroup) -> list:
    """Reduce each marked parameter's gradient over TP as autograd computes it.

    Returns the hook handles (``handle.remove()`` undoes). A tensor hook, not a post-accumulate
    hook: it sees each backward's own gradient, so accumulated gradients are not reduced twice.
    """
    params = sequence_parallel_params(module)
    for p in params:  # so that a flat sync or the DP wrapper does not sum them a second time
        p.sequence_parallel_hooked = True
    return [p.register_hook(lambda grad: comm.all_reduce(grad, tp_group)) for p in params]
