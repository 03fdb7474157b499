"""LayerNorm and RMSNorm over a hidden dim split across tensor-parallel ranks.

Each rank holds ``x: [..., H/tp]`` (its columns of every token) and its ``[H/tp]`` weight and bias
shards. A row's statistics need all H columns, so each direction is local work, one small
collective, local work:

    forward   partial statistics of s = x (+ residual) over H/tp columns     (kernel)
              LayerNorm: all-gather the [2, T] (mean, M2) of every rank and combine them with
              Chan's formula; RMSNorm: all-reduce the [1, T] sum of squares
              y = (s - mean) * rstd * w + b  /  s * rstd * w                 (kernel)
    backward  per-row sum g and sum g*xhat over H/tp columns, g = dy * w     (kernel)
              all-reduce them ([2, T]; RMSNorm [1, T])
              dx, and this rank's dw, db                                     (kernel)

With tp=1 each direction is one fused kernel and no collective. The local steps are the Triton
kernels of ``parallelkit.kernels.norms`` where ``parallelkit.ops._backend.use_triton`` says so, else
:class:`TorchNorms`, the same sharded math in torch. Statistics are float32 (float64 for float64
inputs, on both paths); outputs have x's dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallelkit.distributed import comm, mpu
from parallelkit.ops._backend import use_triton

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xhat(s, mean, rstd):
    """(s - mean) * rstd, or s * rstd for RMSNorm (mean None): a new tensor in rstd's dtype."""
    a = s.to(rstd.dtype)
    return a * rstd[:, None] if mean is None else (a - mean[:, None]).mul_(rstd[:, None])


def _times_weight(t, weight):
    """Each row of ``t`` [T, N] dotted with weight [N] (a plain row sum without a weight)."""
    return t.sum(-1) if weight is None else t @ weight.to(t.dtype)


class TorchNorms:
    """The local steps of ``parallelkit.kernels.norms`` in torch: the same functions, signatures
    (less ``blocks``) and sharded math, for tensors the kernels do not run on. Each [T, N] pass
    allocates at most one temporary, updated in place (on CPU page faults cost more than the
    arithmetic)."""

    @staticmethod
    def norm_stats_forward(x, residual=None, *, rms):
        s = x if residual is None else x + residual
        a = s.to(_stats_dtype(s.dtype))
        if rms:
            return s, torch.linalg.vector_norm(a, dim=-1).square()[None]
        mean = a.mean(-1)  # then M2 around it: two passes, no sum s^2 cancellation
        return s, torch.stack([mean, torch.linalg.vector_norm(a - mean[:, None], dim=-1).square()])

    @staticmethod
    def norm_apply_forward(s, weight, bias, mean, rstd, *, rms):
        y = _xhat(s, mean, rstd)
        if weight is not None:
            y.mul_(weight.to(rstd.dtype))
        if bias is not None:
            y.add_(bias.to(rstd.dtype))
        return y.to(s.dtype)

    @staticmethod
    def fused_norm_forward(x, residual, weight, bias, eps, *, rms):
        s, stats = TorchNorms.norm_stats_forward(x, residual, rms=rms)
        mean, rstd = None if rms else stats[0], torch.rsqrt(stats[-1] / x.shape[1] + eps)
        return s, TorchNorms.norm_apply_forward(s, weight, bias, mean, rstd, rms=rms), mean, rstd

    @staticmethod
    def norm_sums_backward(s, dy, weight, mean, rstd, *, rms):
        dy = dy.to(rstd.dtype)
        sum_gxhat = _times_weight(_xhat(s, mean, rstd).mul_(dy), weight)  # g = dy * weight
        return sum_gxhat[None] if rms else torch.stack([_times_weight(dy, weight), sum_gxhat])

    @staticmethod
    def norm_dx_backward(s, dy, weight, mean, rstd, sums, n_full, residual_grad=None, *, rms,
                         has_bias):
        dy, xhat = dy.to(rstd.dtype), _xhat(s, mean, rstd)
        dw = None if weight is None else (dy * xhat).sum(0)
        db = dy.sum(0) if has_bias else None
        g = dy if weight is None else dy * weight.to(rstd.dtype)
        dx = xhat.mul_((sums[-1] / -n_full)[:, None]).add_(g)  # g - xhat * sum_gxhat / H
        if not rms:
            dx.sub_((sums[0] / n_full)[:, None])
        dx.mul_(rstd[:, None])
        if residual_grad is not None:
            dx.add_(residual_grad)
        return dx.to(s.dtype), dw, db

    @staticmethod
    def fused_norm_backward(s, dy, weight, mean, rstd, residual_grad=None, *, rms, has_bias):
        sums = TorchNorms.norm_sums_backward(s, dy, weight, mean, rstd, rms=rms)
        return TorchNorms.norm_dx_backward(s, dy, weight, mean, rstd, sums, s.shape[1],
                                           residual_grad, rms=rms, has_bias=has_bias)


def local_steps(x: torch.Tensor):
    """The implementation of the local steps for ``x``: the Triton launchers or TorchNorms."""
    if use_triton(x):
        from parallelkit.kernels import norms  # imports triton, which a CPU install may lack

        return norms
    return TorchNorms


def _global_statistics(stats, n_local, eps, rms, tp_group):
    """Each row's mean (None for RMSNorm) and rstd over all ranks' columns, from this rank's
    partial ``stats`` (see ``norm_stats_forward``): one collective of [2, T] or [1, T]."""
    n_full = n_local * dist.get_world_size(tp_group)
    if rms:
        return None, torch.rsqrt(comm.all_reduce(stats[0], tp_group) / n_full + eps)
    # Chan's parallel variance with equal counts n: M2 = sum_r M2_r + n sum_r (mean_r - mean)^2,
    # in float64 on these tiny tensors; no rank's partial ever holds sum s^2.
    partials = comm.all_gather(stats.unsqueeze(0), 0, tp_group).double()  # [tp, 2, T]
    means = partials[:, 0]
    mean = means.mean(0)
    m2 = partials[:, 1].sum(0) + n_local * (means - mean).square().sum(0)
    return mean.to(stats.dtype), torch.rsqrt(m2 / n_full + eps).to(stats.dtype)


class ParallelNormFunction(torch.autograd.Function):
    """LayerNorm (``rms=False``) or RMSNorm (``rms=True``) of rows split across ``tp_group``.

    forward(x [T, N], weight [N] | None, bias [N] | None, residual [T, N] | None, eps, rms,
    tp_group) -> y [T, N], or (y, s) with s = x + residual when residual is given; N = H/tp,
    contiguous. Use :func:`parallel_layer_norm` / :func:`parallel_rms_norm`, which check inputs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, rms, tp_group):
        steps, n_local = local_steps(x), x.shape[1]
        if dist.get_world_size(tp_group) == 1:
            s, y, mean, rstd = steps.fused_norm_forward(x, residual, weight, bias, eps, rms=rms)
        else:
            s, stats = steps.norm_stats_forward(x, residual, rms=rms)
            with comm.entry_checked():
                mean, rstd = _global_statistics(stats, n_local, eps, rms, tp_group)
            y = steps.norm_apply_forward(s, weight, bias, mean, rstd, rms=rms)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.steps, ctx.rms, ctx.tp_group = steps, rms, tp_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)  # an unused new residual stream costs no zeros
        return y if residual is None else (y, s)

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, mean, rstd = ctx.saved_tensors
        steps, rms, tp_group = ctx.steps, ctx.rms, ctx.tp_group
        dy = torch.zeros_like(s) if dy is None else dy.contiguous()
        ds = None if ds is None else ds.contiguous()
        has_bias = ctx.bias_dtype is not None
        tp = dist.get_world_size(tp_group)
        if tp == 1:
            dx, dw, db = steps.fused_norm_backward(s, dy, weight, mean, rstd, ds, rms=rms,
                                                   has_bias=has_bias)
        else:
            with comm.entry_checked():  # dy is shaped like y, which the forward checked
                sums = comm.all_reduce(steps.norm_sums_backward(s, dy, weight, mean, rstd,
                                                                rms=rms), tp_group)
            dx, dw, db = steps.norm_dx_backward(s, dy, weight, mean, rstd, sums, s.shape[1] * tp,
                                                ds, rms=rms, has_bias=has_bias)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(ctx.bias_dtype)
        residual_grad = dx if ctx.needs_input_grad[3] else None
        return dx, dw, db, residual_grad, None, None, None


def parallel_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float = 1e-5, tp_group: dist.ProcessGroup | None = None,
                        residual: torch.Tensor | None = None):
    """LayerNorm over a hidden dim H split across ``tp_group`` (default: the MPU's TP group).

    Args:
        x: ``[..., H/tp]`` this rank's hidden slice; float32, bfloat16, float16 or float64.
        weight, bias: ``[H/tp]`` this rank's shards, or None (no affine / no bias).
        residual: ``[..., H/tp]`` like x, or None: normalizes ``s = x + residual``, fused.
    Returns:
        y ``[..., H/tp]`` in x's dtype, or ``(y, s)`` when residual is given (s: the new residual
        stream, for the next block's skip connection).
    """
    return _parallel_norm("parallel_layer_norm", x, weight, bias, eps, tp_group, residual, False)


def parallel_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None = 1e-6,
                      tp_group: dist.ProcessGroup | None = None,
                      residual: torch.Tensor | None = None):
    """RMSNorm ``s / sqrt(mean(s^2) + eps) * weight`` over a hidden dim split across ``tp_group``.

    Shapes, residual and result as :func:`parallel_layer_norm`. ``eps=None`` is
    ``torch.finfo(float32).eps`` (float64 inputs: ``finfo(float64).eps``), as in
    ``torch.nn.functional.rms_norm``.
    """
    if eps is None:
        eps = torch.finfo(_stats_dtype(x.dtype)).eps
    return _parallel_norm("parallel_rms_norm", x, weight, None, eps, tp_group, residual, True)


# The layers' names: what a user of ParallelRMSNorm reads when its ranks disagree.
_LAYER_NAMES = {"parallel_layer_norm": "ParallelLayerNorm", "parallel_rms_norm": "ParallelRMSNorm"}


def _parallel_norm(op, x, weight, bias, eps, tp_group, residual, rms):
    tp_group = mpu.get_tp_group() if tp_group is None else tp_group
    # Each row's statistics combine partials from every TP rank: the ranks must hold the same
    # rows, so a shape or dtype one rank alone has is an error on all of them, before any
    # collective (which would abort on unequal sizes).
    comm.check_ranks_agree(tp_group, _LAYER_NAMES[op], ranks="tensor-parallel",
                           check=lambda: _check_inputs(op, x, weight, bias, residual),
                           input_shape=x.shape, dtype=x.dtype, eps=eps,
                           fix="every TP rank must pass the same tokens (same sequence length "
                               "and batch), its H/tp hidden slice, in one dtype")
    n_local = x.shape[-1]
    flat = x.reshape(-1, n_local).contiguous()
    flat_residual = None if residual is None else residual.reshape(-1, n_local).contiguous()
    out = ParallelNormFunction.apply(flat, None if weight is None else weight.contiguous(),
                                     None if bias is None else bias.contiguous(), flat_residual,
                                     float(eps), rms, tp_group)
    if residual is None:
        return out.view(x.shape)
    return out[0].view(x.shape), out[1].view(x.shape)


def _check_inputs(op, x, weight, bias, residual) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x has dtype {x.dtype}; it must be float32, bfloat16, float16 or "
                        "float64 (convert it first, e.g. x.float())")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must be [..., H/tp], got a 0-d tensor")
    n_local = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.device != x.device:
            raise ValueError(f"{op}: {name} is on {param.device} but x is on {x.device}; move "
                             f"them to one device (e.g. module.to({str(x.device)!r}))")
        if not param.is_floating_point():
            raise TypeError(f"{op}: {name} has dtype {param.dtype}; it must be floating point")
        if param.dim() != 1 or param.shape[0] != n_local:
            raise ValueError(f"{op}: x has shape {tuple(x.shape)} but {name} has shape "
                             f"{tuple(param.shape)}: x's last dim must be this rank's H/tp "
                             f"columns, the length of its {name} shard (pass x's hidden slice)")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual has shape {tuple(residual.shape)} but x has shape "
                             f"{tuple(x.shape)}; the residual stream must be shaped like x")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"{op}: residual is {residual.dtype} on {residual.device} but x is "
                            f"{x.dtype} on {x.device}; convert it (residual.to(x))")
