"""ParallelLayerNorm / ParallelRMSNorm and their ops on 1, 2 and 4 TP ranks (gloo): each rank's
slice of the output, of the new residual stream and of every gradient equals the full-hidden
float64 reference's, on the torch path and on the Triton kernels (interpreter), with one
collective per direction."""

import pytest
import torch
from torch import nn

from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.ops.norms import local_steps, parallel_layer_norm, parallel_rms_norm
from parallelkit.reference import norms as reference
from parallelkit.tensor_parallel.norms import ParallelLayerNorm, ParallelRMSNorm
from parallelkit.testing import run_on_ranks
from parallelkit.testing.backends import BACKENDS, local_backend
from parallelkit.testing.tolerances import assert_close

HIDDEN = 96  # 96, 48 or 24 columns per rank: not powers of two
LEAD = (3, 5)  # [s, b] tokens
EPS = 1e-5
# Reductions: the row statistics and dx sum over the hidden dim, dweight and dbias over the tokens.
TERMS = HIDDEN + LEAD[0] * LEAD[1]


def full_tensors(dtype, rms, offset=0.0):
    """x, residual, weight, bias (None for RMSNorm), dy, d(new residual) over the full hidden dim,
    the same on every rank (fixed seed). x has a trend along the hidden dim, so the ranks'
    slices have different means and the cross-rank variance term matters."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    trend = torch.linspace(-1, 1, HIDDEN, dtype=torch.float64)
    tensors = [offset + 0.5 + rand(*LEAD, HIDDEN) + trend, rand(*LEAD, HIDDEN),
               1 + 0.25 * rand(HIDDEN), None if rms else rand(HIDDEN),
               rand(*LEAD, HIDDEN), rand(*LEAD, HIDDEN)]
    return [None if t is None else t.to(dtype) for t in tensors]


def forward_backward(norm, x, residual, weight, bias, dy, ds):
    """``norm(x, residual, weight, bias)`` and its backward of loss = sum(y dy) + sum(s ds), on
    fresh leaves; returns y, the new residual stream s (or None) and the leaves' gradients."""
    leaves = [None if t is None else t.detach().clone().requires_grad_()
              for t in (x, residual, weight, bias)]
    out = norm(*leaves)
    y, s = (out, None) if residual is None else out
    loss = (y * dy.to(y.dtype)).sum()
    if s is not None:
        loss = loss + (s * ds.to(s.dtype)).sum()
    loss.backward()
    return y.detach(), None if s is None else s.detach(), [
        None if t is None else t.grad for t in leaves]


def reference_norm(rms):
    if rms:
        return lambda x, residual, weight, _: reference.rms_norm(x, weight, EPS, residual)
    return lambda x, residual, weight, bias: reference.layer_norm(x, weight, bias, EPS, residual)


def parallel_norm(rms):
    if rms:
        return lambda x, residual, weight, _: parallel_rms_norm(x, weight, EPS, residual=residual)
    return lambda x, residual, weight, bias: parallel_layer_norm(x, weight, bias, EPS,
                                                                 residual=residual)


def expected_collectives(tp, rms):
    if tp == 1:
        return {}
    return {"all_reduce": 2} if rms else {"all_gather": 1, "all_reduce": 1}


def _op_parity(tp, rms, dtype, offset=0.0, tolerance=None):
    """tolerance: dict(rtol, atol) instead of the dtype's."""
    state = mpu.initialize(tp=tp)
    width = HIDDEN // tp
    mine = slice(state.tp.rank * width, (state.tp.rank + 1) * width)
    full = full_tensors(dtype, rms, offset)
    x, residual, weight, bias, dy, ds = full
    local = [None if t is None else t[..., mine] for t in full]

    def check(actual, expected_value, name):
        if tolerance is None:
            assert_close(actual, expected_value, name=name, terms=TERMS)
        else:
            torch.testing.assert_close(actual, expected_value.to(actual.dtype), **tolerance,
                                       msg=lambda m: f"{name}: {m}")

    for with_residual in (False, True):
        keep = (lambda t: t) if with_residual else (lambda t: None)
        y_ref, s_ref, grads_ref = forward_backward(reference_norm(rms), x, keep(residual),
                                                   weight, bias, dy, ds)
        for name in BACKENDS:
            with local_backend(name), comm.count_traffic() as traffic:
                assert (local_steps(local[0]).__name__ == "TorchNorms") == (name == "torch")
                y, s, grads = forward_backward(parallel_norm(rms), local[0], keep(local[1]),
                                               *local[2:])
            what = f"{name} backend, residual={with_residual}"
            assert dict(traffic.calls) == expected_collectives(tp, rms), what
            assert y.dtype == dtype and y.shape == local[0].shape, what
            check(y, y_ref[..., mine], f"y ({what})")
            if with_residual:
                check(s, s_ref[..., mine], f"s ({what})")
            for grad_name, grad, ref in zip(("dx", "d residual", "dweight", "dbias"), grads,
                                            grads_ref):
                assert (grad is None) == (ref is None), f"{grad_name} ({what})"
                if grad is not None:
                    check(grad, ref[..., mine], f"{grad_name} ({what})")
    return state.tp.rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_slices_of_output_and_gradients_match_the_full_norm(tp, rms, dtype):
    run_on_ranks(_op_parity, max(tp, 2), tp, rms, dtype, timeout=120)


def test_layer_norm_of_rows_with_a_large_offset_fp64():
    """x = 1e4 + N(0, 1) in float64: combining sum s and sum s^2 across ranks would get the
    variance ~1e-8 wrong (the sum of squares ~1e8 has an ulp of 1.5e-8), so y by as much. With
    Chan's combination of (mean, M2) partials what remains is the rounding of the mean itself,
    ulp(1e4) / 2 ~ 1e-12, in y (and through xhat in the gradients, summed over rows): 1e-10."""
    run_on_ranks(_op_parity, 4, 4, False, torch.float64, 1e4, dict(rtol=1e-10, atol=1e-10),
                 timeout=120)


def dense_norms(dtype):
    torch.manual_seed(0)
    norms = [nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN, bias=False),
             nn.LayerNorm(HIDDEN, elementwise_affine=False), nn.RMSNorm(HIDDEN),
             nn.RMSNorm(HIDDEN, eps=1e-5, elementwise_affine=False)]
    with torch.no_grad():
        for norm in norms:
            for param in norm.parameters():
                param.normal_(1.0, 0.25)
    return [norm.to(dtype) for norm in norms]


def _from_dense(tp, dtype):
    state = mpu.initialize(tp=tp)
    width = HIDDEN // tp
    mine = slice(state.tp.rank * width, (state.tp.rank + 1) * width)
    x, _, _, _, dy, _ = full_tensors(dtype, rms=True)
    for dense in dense_norms(dtype):
        parallel_type = ParallelRMSNorm if isinstance(dense, nn.RMSNorm) else ParallelLayerNorm
        layer = parallel_type.from_dense(dense)
        assert layer.eps == dense.eps and layer.local_hidden == width
        dense_params = dict(dense.named_parameters())
        assert dense_params.keys() == dict(layer.named_parameters()).keys()
        x_full = x.clone().requires_grad_()
        y_dense = dense(x_full)
        y_dense.backward(dy)
        for name in BACKENDS:
            layer.zero_grad()
            x_local = x[..., mine].clone().requires_grad_()
            with local_backend(name):
                y = layer(x_local)
                y.backward(dy[..., mine])
            what = f"{dense} ({name} backend)"
            assert_close(y, y_dense.detach()[..., mine], name=f"y of {what}", terms=TERMS)
            assert_close(x_local.grad, x_full.grad[..., mine], name=f"dx of {what}",
                         terms=TERMS)
            for param_name, param in layer.named_parameters():
                assert param.tp_shard_dim == 0
                assert torch.equal(param.detach(), dense_params[param_name].detach()[mine])
                assert_close(param.grad, dense_params[param_name].grad[mine],
                             name=f"d{param_name} of {what}", terms=TERMS)
    return width


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("tp", [2, 4])
def test_from_dense_computes_the_slice_of_the_dense_norm(tp, dtype):
    run_on_ranks(_from_dense, tp, tp, dtype, timeout=120)


def _fresh_layers_and_residual_output(tp):
    mpu.initialize(tp=tp)
    width = HIDDEN // tp
    layer = ParallelLayerNorm(HIDDEN)
    assert torch.equal(layer.weight, torch.ones(width))
    assert torch.equal(layer.bias, torch.zeros(width))
    rms = ParallelRMSNorm(HIDDEN, dtype=torch.float64)
    assert rms.bias is None and rms.weight.dtype == torch.float64 and rms.eps == 1e-6
    x, residual = torch.randn(4, width), torch.randn(4, width)
    y, new_residual = layer(x, residual)
    assert torch.equal(new_residual, x + residual)
    assert_close(layer(x + residual), y, terms=HIDDEN)
    assert "hidden=96" in repr(layer)
    return True


def test_fresh_layers_and_the_residual_output():
    run_on_ranks(_fresh_layers_and_residual_output, 2, 2, timeout=60)


def _bad_inputs(tp):
    with pytest.raises(ValueError, match="mpu is not initialized"):
        parallel_layer_norm(torch.zeros(2, 4), None, None)
    mpu.initialize(tp=tp)
    width = HIDDEN // tp
    layer = ParallelLayerNorm(HIDDEN)
    x, weight = torch.zeros(2, width), torch.ones(width)
    cases = [
        (lambda: ParallelLayerNorm(10), ValueError,
         r"ParallelLayerNorm hidden=10 is not divisible by the tensor-parallel size tp=4"),
        (lambda: ParallelRMSNorm(HIDDEN + 2), ValueError, r"hidden=98 is not divisible"),
        (lambda: layer(torch.zeros(2, HIDDEN)), ValueError,
         rf"expects this rank's hidden slice \[\.\.\., {width}\], got shape \(2, {HIDDEN}\)"),
        (lambda: parallel_layer_norm(torch.zeros(2, width + 1), weight, None), ValueError,
         r"x's last dim must be this rank's H/tp columns"),
        (lambda: parallel_layer_norm(torch.zeros(2, width, dtype=torch.int64), weight, None),
         TypeError, r"x has dtype torch.int64; it must be float32"),
        (lambda: parallel_rms_norm(x, torch.ones(width, device="meta")), ValueError,
         r"weight is on meta but x is on cpu; move them to one device"),
        (lambda: layer(x, residual=torch.zeros(3, width)), ValueError,
         r"residual has shape \(3, 24\) but x has shape \(2, 24\)"),
        (lambda: layer(x, residual=torch.zeros(2, width, dtype=torch.float64)), TypeError,
         r"residual is torch.float64 on cpu but x is torch.float32"),
        (lambda: ParallelLayerNorm.from_dense(nn.Linear(4, 4)), TypeError,
         r"from_dense takes nn.LayerNorm, got Linear"),
        (lambda: ParallelRMSNorm.from_dense(nn.LayerNorm(HIDDEN)), TypeError,
         r"from_dense takes nn.RMSNorm, got LayerNorm"),
        (lambda: ParallelLayerNorm.from_dense(nn.LayerNorm((4, HIDDEN))), ValueError,
         r"normalized_shape \(4, 96\); flatten those dims into one"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    return len(cases)


def test_bad_input_is_rejected_with_a_clear_message():
    assert run_on_ranks(_bad_inputs, 4, 4, timeout=60) == [11] * 4
