"""The local steps of the TP norms, one rank's view of [T, H] rows, against float64 math: the
Triton launchers of parallelkit.kernels.norms (in the interpreter on CPU) and their torch twin
parallelkit.ops.norms.TorchNorms, through the same tests. Every Triton output starts as NaN."""

import pytest
import torch

from parallelkit.kernels import norms as triton_norms
from parallelkit.kernels.norms import NormBlocks, norm_blocks
from parallelkit.ops.norms import TorchNorms
from parallelkit.reference import norms as reference
from parallelkit.testing.tolerances import assert_close, tolerance

EPS = 1e-5
IMPLS = [pytest.param(triton_norms, id="triton"), pytest.param(TorchNorms, id="torch")]
KINDS = [pytest.param(False, id="layer"), pytest.param(True, id="rms")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# The tiling the launchers choose on a GPU, run in the interpreter: whatever the interpreter's own
# default is, the masks and block loops a GPU executes are the ones tested.
GPU = "the GPU's tiling"
SM_COUNT = 132  # an H100's or H200's: the backward's persistent grid depends on it
# (T rows, N local columns, Triton tiling; None: the default, one block per row).
SHAPES = [
    pytest.param(0, 16, None, id="no-rows"),
    pytest.param(1, 8, None, id="1x8"),
    pytest.param(37, 48, NormBlocks(8, 64, 3, 4), id="37x48-5tiles-3programs"),
    pytest.param(130, 200, NormBlocks(32, 64, 2, 4), id="130x200-4blocks-per-row"),
    pytest.param(20, 1000, NormBlocks(16, 256, 1, 4), id="20x1000-4blocks-per-row"),
    pytest.param(37, 1000, GPU, id="37x1000-gpu-tiling"),  # 10 row tiles of 4 x 1024
    pytest.param(3, 9008, GPU, id="3x9008-gpu-tiling"),  # 2 blocks of 8192 (float64: 5 of 2048)
]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Each Triton output starts as NaN, so an element a kernel forgets to write fails."""
    monkeypatch.setattr(triton_norms, "_empty", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))


@pytest.fixture(autouse=True)
def gpu_sm_count(monkeypatch):
    """norm_blocks(..., "cuda") without asking a CUDA driver for the SM count."""
    monkeypatch.setattr(triton_norms, "_sm_count", lambda device: SM_COUNT)


def launch_kwargs(impl, blocks, rows=None, cols=None, dtype=None):
    if impl is not triton_norms or blocks is None:
        return {}
    if blocks == GPU:
        blocks = norm_blocks(rows, cols, "cuda", dtype=dtype)
    return {"blocks": blocks}


def make_problem(rows, hidden, dtype, rms, seed=0):
    """x, residual, weight, bias (None for RMSNorm), dy, d(new residual) in ``dtype``. x has a
    trend along the hidden dim, so ranks' column slices have different means."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = 0.5 + rand(rows, hidden) + torch.linspace(-1, 1, hidden, dtype=torch.float64)
    tensors = [x, rand(rows, hidden), 1 + 0.25 * rand(hidden), None if rms else rand(hidden),
               rand(rows, hidden), rand(rows, hidden)]
    return [None if t is None else t.to(dtype) for t in tensors]


def expected(rms, x, residual, weight, bias, dy, ds):
    """Float64 output, new residual stream and gradients (of x, residual, weight, bias) of
    ``loss = sum(y * dy) + sum(s * ds)``, through parallelkit.reference."""
    leaves = [None if t is None else t.double().requires_grad_()
              for t in (x, residual, weight, bias)]
    x64, r64, w64, b64 = leaves
    if rms:
        out = reference.rms_norm(x64, w64, EPS, residual=r64)
    else:
        out = reference.layer_norm(x64, w64, b64, EPS, residual=r64)
    y, s = out if r64 is not None else (out, x64)
    loss = (y * dy.double()).sum()
    if ds is not None:
        loss = loss + (s * ds.double()).sum()
    loss.backward()
    return y.detach(), s.detach(), [None if t is None else t.grad for t in leaves]


def row_stats(s64, rms):
    """Float64 mean (None for RMSNorm) and rstd of each row."""
    spread = (s64 if rms else s64 - s64.mean(-1, keepdim=True)).square().mean(-1)
    return None if rms else s64.mean(-1), torch.rsqrt(spread + EPS)


def assert_close_sum(actual, expected_value, terms, name, dtype=None):
    """A sum of ``terms`` values of order 1 each holding a rounding error of dtype (dw, db over
    rows): the errors add up like a random walk, so the absolute tolerance grows with
    sqrt(terms) on top of the sum's own."""
    assert (actual is None) == (expected_value is None), name
    if actual is not None:
        tol = tolerance(dtype or actual.dtype, max(terms, 1))
        torch.testing.assert_close(actual, expected_value.to(actual.dtype), rtol=tol["rtol"],
                                   atol=tol["atol"] * max(terms, 1) ** 0.5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("rows,cols,blocks", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_sharded_steps_match_float64(impl, rms, dtype, rows, cols, blocks):
    """Rank 1 of 2: it holds columns [N, 2N) of rows of H = 2N, and the full rows' statistics and
    sums come from float64 math where the collectives would give them."""
    kwargs = launch_kwargs(impl, blocks, rows, cols, dtype)
    hidden, mine = 2 * cols, slice(cols, 2 * cols)
    x, residual, weight, bias, dy, ds = make_problem(rows, hidden, dtype, rms)
    local = [None if t is None else t[..., mine].contiguous()
             for t in (x, residual, weight, bias, dy, ds)]
    x_l, residual_l, weight_l, bias_l, dy_l, ds_l = local

    s, stats = impl.norm_stats_forward(x_l, residual_l, rms=rms, **kwargs)
    # (the interpreter rounds bf16 ties differently from torch: hence a tolerance, not equality)
    assert_close(s, x_l + residual_l, name="s", terms=hidden)
    s64 = s.double()
    if rms:
        expected_stats = s64.square().sum(-1)[None]
    else:
        local_mean = s64.mean(-1)
        expected_stats = torch.stack([local_mean, (s64 - local_mean[:, None]).square().sum(-1)])
    assert_close(stats, expected_stats, name="stats", terms=hidden)

    s_full = x + residual  # every rank's s (the interpreter rounds bf16 ties otherwise: use these)
    s = s_full[..., mine].contiguous()
    mean, rstd = row_stats(s_full.double(), rms)
    stat_dtype = stats.dtype
    mean_c = None if rms else mean.to(stat_dtype)
    rstd_c = rstd.to(stat_dtype)
    y = impl.norm_apply_forward(s, weight_l, bias_l, mean_c, rstd_c, rms=rms, **kwargs)
    y_ref, _, (dx_full, _, dw_full, db_full) = expected(rms, s_full, None, weight, bias, dy, None)
    assert_close(y, y_ref[..., mine], name="y", terms=hidden)

    xhat = (s_full.double() - (0 if rms else mean[:, None])) * rstd[:, None]
    g = dy.double() * weight.double()
    sums_full = torch.stack([g.sum(-1), (g * xhat).sum(-1)])[1 if rms else 0:]
    sums = impl.norm_sums_backward(s, dy_l, weight_l, mean_c, rstd_c, rms=rms, **kwargs)
    expected_sums = torch.stack([g[:, mine].sum(-1), (g * xhat)[:, mine].sum(-1)])
    assert_close_sum(sums, expected_sums[1 if rms else 0:], cols, name="sums")

    dx, dw, db = impl.norm_dx_backward(s, dy_l, weight_l, mean_c, rstd_c, sums_full.to(stat_dtype),
                                       hidden, ds_l, rms=rms, has_bias=not rms, **kwargs)
    assert_close(dx, dx_full[..., mine] + ds_l.double(), name="dx", terms=hidden)
    assert_close_sum(dw, dw_full[mine], rows, name="dw")
    assert_close_sum(db, None if rms else db_full[mine], rows, name="db")


@pytest.mark.parametrize("rows,cols,blocks", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.float16, id="fp16"),
                                            pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize("rms", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_full_rows_match_reference(impl, rms, dtype, rows, cols, blocks):
    """tp=1: the fused forward and backward (one kernel each when a row fits one block, else
    two) with the residual add, against the reference's output and autograd gradients."""
    kwargs = launch_kwargs(impl, blocks, rows, cols, dtype)
    x, residual, weight, bias, dy, ds = make_problem(rows, cols, dtype, rms)
    s, y, mean, rstd = impl.fused_norm_forward(x, residual, weight, bias, EPS, rms=rms, **kwargs)
    y_ref, s_ref, (dx_ref, dr_ref, dw_ref, db_ref) = expected(rms, x, residual, weight, bias,
                                                              dy, ds)
    assert_close(s, x + residual, name="s", terms=max(cols, 1))
    assert_close(y, y_ref, name="y", terms=max(cols, 1))
    mean_ref, rstd_ref = row_stats(s.double(), rms)
    assert (mean is None) == rms
    if not rms:
        assert_close(mean, mean_ref, name="mean", terms=max(cols, 1))
    assert_close(rstd, rstd_ref, name="rstd", terms=max(cols, 1))

    dx, dw, db = impl.fused_norm_backward(s, dy, weight, mean, rstd, ds, rms=rms,
                                          has_bias=not rms, **kwargs)
    assert_close(dx, dx_ref, name="dx", terms=max(cols, 1))
    assert_close(dx, dr_ref, name="d residual", terms=max(cols, 1))
    assert_close_sum(dw, dw_ref, rows, name="dw", dtype=dtype)  # float32 sums of dtype's terms
    assert_close_sum(db, db_ref, rows, name="db", dtype=dtype)


@pytest.mark.parametrize("rms", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_without_weight_bias_or_residual(impl, rms):
    x, _, _, _, dy, _ = make_problem(9, 40, torch.float32, rms)
    s, y, mean, rstd = impl.fused_norm_forward(x, None, None, None, EPS, rms=rms)
    assert s is x
    y_ref, _, (dx_ref, *_) = expected(rms, x, None, None, None, dy, None)
    assert_close(y, y_ref, name="y", terms=40)
    dx, dw, db = impl.fused_norm_backward(s, dy, None, mean, rstd, rms=rms, has_bias=False)
    assert_close(dx, dx_ref, name="dx", terms=40)
    assert dw is None and db is None


@pytest.mark.parametrize("rms", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_parameters_with_bfloat16_rows(impl, rms):
    """Mixed precision: bf16 activations, fp32 weight and bias; y and dx stay bf16."""
    x, residual, _, _, dy, ds = make_problem(33, 72, torch.bfloat16, rms)
    _, _, weight, bias, _, _ = make_problem(33, 72, torch.float32, rms, seed=1)
    s, y, mean, rstd = impl.fused_norm_forward(x, residual, weight, bias, EPS, rms=rms)
    y_ref, _, (dx_ref, _, dw_ref, db_ref) = expected(rms, x, residual, weight, bias, dy, ds)
    assert y.dtype == torch.bfloat16
    assert_close(y, y_ref, name="y", terms=72)
    dx, dw, db = impl.fused_norm_backward(s, dy, weight, mean, rstd, ds, rms=rms,
                                          has_bias=not rms)
    assert dx.dtype == torch.bfloat16
    assert_close(dx, dx_ref, name="dx", terms=72)
    assert_close_sum(dw, dw_ref, 33, name="dw", dtype=torch.bfloat16)
    assert_close_sum(db, db_ref, 33, name="db", dtype=torch.bfloat16)


# x = 1e4 + N(0, 1) in float32. sum s^2 / n - mean^2 gives the variance 0 or -8 there instead of
# ~1 (the fp32 sum of squares ~1e8 has an ulp of 8). Mean/M2 partials keep it to ~1e-6 in one
# block; merging blocks (or ranks) uses their means, each held to ulp(1e4) / 2 ~ 5e-4 in float32,
# which leaves ~1e-5. That rounding of the mean also moves y by ~5e-4 * rstd (rstd ~ 1): torch's
# own float32 F.layer_norm is 1.2e-3 off here, hence 4 ulps for y.
ULP_1E4 = 2.0 ** -10


@pytest.mark.parametrize("block_n", [None, 512], ids=["one-block", "8-blocks-per-row"])
@pytest.mark.parametrize("impl", IMPLS)
def test_large_offset_rows_keep_their_variance(impl, block_n):
    rows, cols = 8, 4096
    g = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(rows, cols, generator=g, dtype=torch.float64)).float()
    kwargs = launch_kwargs(impl, None if block_n is None else NormBlocks(8, block_n, 1, 4))
    x64 = x.double()
    var = x64.var(-1, unbiased=False)

    _, stats = impl.norm_stats_forward(x, rms=False, **kwargs)
    torch.testing.assert_close(stats[0].double(), x64.mean(-1), rtol=1e-7, atol=ULP_1E4)
    torch.testing.assert_close(stats[1].double() / cols, var, rtol=1e-4, atol=0)

    _, y, _, rstd = impl.fused_norm_forward(x, None, None, None, EPS, rms=False, **kwargs)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + EPS), rtol=1e-4, atol=0)
    torch.testing.assert_close(y.double(), reference.layer_norm(x, eps=EPS), rtol=0,
                               atol=4 * ULP_1E4)


@pytest.mark.parametrize("rms", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_constant_rows(impl, rms):
    """Zero variance (LayerNorm: y = bias, xhat = 0) and zero rows (RMSNorm: y = 0), no NaN."""
    cols = 300
    values = torch.tensor([0.0, 3.0, -1e4, 1e-3])
    x = values[:, None].expand(-1, cols).contiguous()
    _, _, weight, bias, dy, _ = make_problem(4, cols, torch.float32, rms)
    kwargs = launch_kwargs(impl, NormBlocks(4, 128, 1, 4))  # 3 blocks per row
    s, y, mean, rstd = impl.fused_norm_forward(x, None, weight, bias, EPS, rms=rms, **kwargs)
    y_ref, _, (dx_ref, _, dw_ref, db_ref) = expected(rms, x, None, weight, bias, dy, None)
    assert_close(y, y_ref, name="y", terms=cols)
    dx, dw, db = impl.fused_norm_backward(s, dy, weight, mean, rstd, rms=rms, has_bias=not rms,
                                          **kwargs)
    assert_close(dx, dx_ref, name="dx", terms=cols)
    assert_close_sum(dw, dw_ref, 4, name="dw")
    assert_close_sum(db, db_ref, 4, name="db")


def test_gpu_tiling_cases_differ_from_the_interpreters_default():
    """The GPU shapes above run tilings the interpreter would not choose by itself."""
    for rows, cols, dtype in [(37, 1000, torch.float32), (3, 9008, torch.float32),
                              (3, 9008, torch.float64)]:
        assert norm_blocks(rows, cols, "cuda", dtype=dtype) != norm_blocks(rows, cols, "cpu",
                                                                            dtype=dtype)
