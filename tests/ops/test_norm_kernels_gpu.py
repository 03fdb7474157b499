"""The norm kernels compiled for the GPU, at the tiling they pick for CUDA (test_norm_kernels.py
runs the same launchers in Triton's interpreter, with its problems, references and tolerances,
imported here): the fused tp=1 forward and backward, one kernel each while a row fits one block
and two beyond, and LayerNorm's and RMSNorm's sharded steps for the two halves of each row, as two
TP ranks would run them, with the collectives done here in float64. Every output starts as NaN."""

import pytest
import torch
from test_norm_kernels import (EPS, KINDS, ULP_1E4, assert_close_sum, expected, make_problem,
                               row_stats)
from test_norm_kernels import poison_outputs  # noqa: F401  (its autouse fixture, here too)

from parallelkit.kernels import norms as triton_norms
from parallelkit.reference import norms as reference
from parallelkit.testing.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# (rows, hidden, dtype): CUDA tiles up to 8192 columns, so 12288 takes two blocks per row.
FUSED = [(2048, 4096, BF16), (2048, 4096, F32), (333, 12288, BF16), (333, 12288, F32),
         (7, 1000, F16), (7, 1000, F64), (0, 64, F32)]
SHARDED = [(1024, 8192, BF16), (300, 20000, F32)]  # halves of 4096 (one block) and 10000 (two)


def on_gpu(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def halves(t):
    """Rank 0's and rank 1's columns of ``t`` (None: None for both), on the GPU."""
    return [None, None] if t is None else on_gpu(*(h.contiguous() for h in t.chunk(2, -1)))


@pytest.mark.parametrize("rows,hidden,dtype", FUSED, ids=str)
@pytest.mark.parametrize("rms", KINDS)
def test_fused_tp1_kernels_match_float64(rms, rows, hidden, dtype):
    x, residual, weight, bias, dy, ds = make_problem(rows, hidden, dtype, rms)
    x_c, residual_c, weight_c, bias_c, dy_c, ds_c = on_gpu(x, residual, weight, bias, dy, ds)
    s, y, mean, rstd = triton_norms.fused_norm_forward(x_c, residual_c, weight_c, bias_c, EPS,
                                                       rms=rms)
    y_ref, _, (dx_ref, _, dw_ref, db_ref) = expected(rms, x, residual, weight, bias, dy, ds)
    terms = max(hidden, 1)
    assert_close(s.cpu(), x + residual, name="s", terms=terms)
    assert_close(y.cpu(), y_ref, name="y", terms=terms)
    mean_ref, rstd_ref = row_stats(s.cpu().double(), rms)
    assert (mean is None) == rms
    if not rms:
        assert_close(mean.cpu(), mean_ref, name="mean", terms=terms)
    assert_close(rstd.cpu(), rstd_ref, name="rstd", terms=terms)

    dx, dw, db = triton_norms.fused_norm_backward(s, dy_c, weight_c, mean, rstd, ds_c, rms=rms,
                                                  has_bias=not rms)
    assert_close(dx.cpu(), dx_ref, name="dx", terms=terms)
    assert_close_sum(dw.cpu(), dw_ref, rows, name="dw", dtype=dtype)
    assert_close_sum(None if db is None else db.cpu(), db_ref, rows, name="db", dtype=dtype)


@pytest.mark.parametrize("rms", KINDS)
def test_fused_tp1_kernels_with_float32_parameters_and_bfloat16_rows(rms):
    """Mixed precision as training runs it: bf16 activations, fp32 weight and bias."""
    x, residual, _, _, dy, ds = make_problem(1024, 4096, BF16, rms)
    _, _, weight, bias, _, _ = make_problem(1024, 4096, F32, rms, seed=1)
    x_c, residual_c, weight_c, bias_c, dy_c, ds_c = on_gpu(x, residual, weight, bias, dy, ds)
    s, y, mean, rstd = triton_norms.fused_norm_forward(x_c, residual_c, weight_c, bias_c, EPS,
                                                       rms=rms)
    y_ref, _, (dx_ref, _, dw_ref, db_ref) = expected(rms, x, residual, weight, bias, dy, ds)
    assert y.dtype == BF16
    assert_close(y.cpu(), y_ref, name="y", terms=4096)
    dx, dw, db = triton_norms.fused_norm_backward(s, dy_c, weight_c, mean, rstd, ds_c, rms=rms,
                                                  has_bias=not rms)
    assert dx.dtype == BF16
    assert_close(dx.cpu(), dx_ref, name="dx", terms=4096)
    assert_close_sum(dw.cpu(), dw_ref, 1024, name="dw", dtype=BF16)
    assert_close_sum(None if db is None else db.cpu(), db_ref, 1024, name="db", dtype=BF16)


def merged_statistics(stats, n_local, hidden, rms):
    """What the forward's collective gives every rank, in float64 from the ranks' [2, T]
    partials: Chan's merge of (mean, M2) for LayerNorm, the summed sum s^2 for RMSNorm."""
    stats = torch.stack([st.double() for st in stats])  # [ranks, 2 | 1, T]
    if rms:
        return None, torch.rsqrt(stats[:, 0].sum(0) / hidden + EPS)
    mean = stats[:, 0].mean(0)
    m2 = stats[:, 1].sum(0) + n_local * (stats[:, 0] - mean).square().sum(0)
    return mean, torch.rsqrt(m2 / hidden + EPS)


@pytest.mark.parametrize("rows,hidden,dtype", SHARDED, ids=str)
@pytest.mark.parametrize("rms", KINDS)
def test_sharded_steps_of_two_ranks_match_float64(rms, rows, hidden, dtype):
    x, residual, weight, bias, dy, ds = make_problem(rows, hidden, dtype, rms)
    ranks = list(zip(*map(halves, (x, residual, weight, bias, dy, ds))))  # each (x, ..., ds)
    n_local, stat_dtype = hidden // 2, triton_norms.stats_dtype(dtype)
    forward = [triton_norms.norm_stats_forward(x_r, r_r, rms=rms)
               for x_r, r_r, *_ in ranks]
    mean, rstd = merged_statistics([st for _, st in forward], n_local, hidden, rms)
    mean = None if mean is None else mean.to(stat_dtype).cuda()
    rstd = rstd.to(stat_dtype).cuda()
    y = [triton_norms.norm_apply_forward(s, w_r, b_r, mean, rstd, rms=rms)
         for (s, _), (_, _, w_r, b_r, _, _) in zip(forward, ranks)]
    sums = sum(triton_norms.norm_sums_backward(s, dy_r, w_r, mean, rstd, rms=rms)
               for (s, _), (_, _, w_r, _, dy_r, _) in zip(forward, ranks))  # the all-reduce
    grads = [triton_norms.norm_dx_backward(s, dy_r, w_r, mean, rstd, sums, hidden, ds_r, rms=rms,
                                           has_bias=not rms)
             for (s, _), (_, _, w_r, _, dy_r, ds_r) in zip(forward, ranks)]

    y_ref, _, (dx_ref, _, dw_ref, db_ref) = expected(rms, x, residual, weight, bias, dy, ds)
    assert_close(torch.cat(y, -1).cpu(), y_ref, name="y", terms=hidden)
    dx, dw, db = (None if parts[0] is None else torch.cat(parts, -1).cpu()
                  for parts in zip(*grads))
    assert_close(dx, dx_ref, name="dx", terms=hidden)
    assert_close_sum(dw, dw_ref, rows, name="dw", dtype=dtype)
    assert_close_sum(db, db_ref, rows, name="db", dtype=dtype)


@pytest.mark.parametrize("hidden", [4096, 16384], ids=["one-block", "2-blocks-per-row"])
def test_large_offset_rows_keep_their_variance(hidden):
    """LayerNorm of float32 rows 1e4 + N(0, 1) (see test_norm_kernels.py): the mean/M2
    partials keep the variance where sum s^2 - (sum s)^2 / n would lose it."""
    g = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(64, hidden, generator=g, dtype=torch.float64)).float()
    x64, var = x.double(), x.double().var(-1, unbiased=False)
    _, stats = triton_norms.norm_stats_forward(x.cuda(), rms=False)
    torch.testing.assert_close(stats[0].cpu().double(), x64.mean(-1), rtol=1e-7, atol=ULP_1E4)
    torch.testing.assert_close(stats[1].cpu().double() / hidden, var, rtol=1e-4, atol=0)
    _, y, _, rstd = triton_norms.fused_norm_forward(x.cuda(), None, None, None, EPS, rms=False)
    torch.testing.assert_close(rstd.cpu().double(), torch.rsqrt(var + EPS), rtol=1e-4, atol=0)
    torch.testing.assert_close(y.cpu().double(), reference.layer_norm(x, eps=EPS), rtol=0,
                               atol=4 * ULP_1E4)
