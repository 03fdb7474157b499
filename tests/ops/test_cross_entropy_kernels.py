"""The cross-entropy kernels (Triton's interpreter on CPU, CUDA where present) and the op's torch
path against float64 math, on one rank's slice of the vocabulary; input errors of the op."""

import pytest
import torch

import parallelkit.kernels.cross_entropy as kernels
from parallelkit.kernels.cross_entropy import (ROW_MAX, SHIFTED_SUM, SUM_EXP, TARGET_LOGIT,
                                               cross_entropy_backward, cross_entropy_stats_forward)
from parallelkit.ops.cross_entropy import _grad_torch, _stats_torch, vocab_parallel_cross_entropy
from parallelkit.reference.cross_entropy import cross_entropy_reference
from parallelkit.testing.tolerances import assert_close, tolerance

IGNORE = -100
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])
# (implementation, logits dtype): the kernels take the training dtypes, the torch path also float64.
IMPLS = [("triton", torch.float32), ("triton", torch.bfloat16), ("triton", torch.float16),
         ("torch", torch.float64), ("torch", torch.float32), ("torch", torch.bfloat16)]
# (rows T, full vocabulary V, this slice's width, its first column, BLOCK_V or None for default)
CASES = [
    (1, 7, 7, 0, None),          # one row, the whole (odd) vocabulary: tp = 1
    (37, 1000, 1000, 0, None),   # one block, not a power of two
    (19, 300, 100, 100, 32),     # middle slice in 4 blocks, the last one partial
    (300, 5000, 2500, 2500, None),  # rows longer than the default block; several programs
]
# The statistics accumulate in float32 (float64 for float64 logits) and the reference sees the
# same rounded inputs, so only accumulation order separates them: the max and the target logit
# are exact, Σexp agrees to rtol, Σ(x - max) to rtol times Σ|x - max|.
STATS_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def make_logits(rows, vocab, kind="normal", seed=0):
    """float64 [rows, vocab] logits and [rows] targets (every 5th row ignored)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    x = {"normal": 3 * x, "huge": 1e4 * x, "offset": 1e4 + x, "negative offset": -1e4 + x,
         "equal": torch.full_like(x, 2.5)}.get(kind, x)
    if kind == "masked":  # -inf columns, as for vocabulary padding; some rows' slice all -inf
        x = x.masked_fill(torch.rand(rows, vocab, generator=g) < 0.3, float("-inf"))
        x[::3, 1:] = float("-inf")
        x[::3, 0] = 1.0
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = IGNORE
    return x, targets


def stats(impl, logits, targets, vocab_start, block_v):
    if impl == "torch":
        return _stats_torch(logits, targets, vocab_start)
    out = torch.full((4, logits.shape[0]), float("nan"), device=logits.device)  # poisoned
    result = cross_entropy_stats_forward(logits, targets, vocab_start, out=out, block_v=block_v)
    assert result is out
    return out


def grad(impl, logits, targets, row_max, log_sum, grad_row, vocab_start, vocab, smoothing,
         block_v, inplace=False):
    if impl == "torch":
        return _grad_torch(logits, targets, row_max, log_sum, grad_row, vocab_start, vocab,
                           smoothing, IGNORE, inplace=inplace)
    out = None if inplace else torch.full_like(logits, float("nan"))  # poisoned
    return cross_entropy_backward(logits, targets, row_max, log_sum, grad_row, vocab_start, vocab,
                                  smoothing, IGNORE, inplace=inplace, out=out, block_v=block_v)


def expected_stats(x, targets, vocab_start):
    """float64 [4, T] statistics of one slice x: [T, n_local]."""
    row_max = x.amax(dim=1)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)  # a row of -inf: 0, Σx = -inf
    sum_exp = torch.exp(x - shift[:, None]).sum(dim=1)
    local = targets - vocab_start
    owned = (local >= 0) & (local < x.shape[1])
    target = torch.where(owned, x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1), 0)
    return torch.stack([row_max, sum_exp, target, (x - shift[:, None]).sum(dim=1)])


def check_stats(actual, expected, x, acc_dtype):
    rtol = STATS_RTOL[acc_dtype]
    actual = actual.cpu().double()
    for row in (ROW_MAX, TARGET_LOGIT):
        assert torch.equal(actual[row], expected[row]), row
    torch.testing.assert_close(actual[SUM_EXP], expected[SUM_EXP], rtol=10 * rtol, atol=0)
    shifted = x - expected[ROW_MAX][:, None]
    scale = torch.where(shifted.isinf(), 0.0, shifted.abs()).nan_to_num(0.0).sum(dim=1)
    close = (actual[SHIFTED_SUM] - expected[SHIFTED_SUM]).abs() <= rtol * scale
    assert torch.all(close | (actual[SHIFTED_SUM] == expected[SHIFTED_SUM])), "logit sum"


def run_case(impl, dtype, device, case, kind, smoothing, inplace=False):
    """Stats and gradient of one slice vs float64 math on the same rounded inputs."""
    rows, vocab, n_local, start, block_v = case
    full, targets = make_logits(rows, vocab, kind)
    full = full.to(dtype).double()  # what the kernel sees, exactly
    part = full[:, start:start + n_local]
    logits, targets = part.to(device, dtype), targets.to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    local = stats(impl, logits, targets, start, block_v)
    assert local.dtype == acc
    check_stats(local, expected_stats(part, targets.cpu(), start), part, acc)

    row_max = full.amax(dim=1)
    log_sum = torch.log(torch.exp(full - row_max[:, None]).sum(dim=1))
    grad_row = torch.rand(rows, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference_input = full.clone().requires_grad_()
    loss = cross_entropy_reference(reference_input, targets.cpu(), smoothing, IGNORE, "none")
    loss.backward(grad_row)
    expected = reference_input.grad[:, start:start + n_local]

    to_acc = dict(device=device, dtype=acc)
    actual = grad(impl, logits, targets, row_max.to(**to_acc), log_sum.to(**to_acc),
                  grad_row.to(**to_acc), start, vocab, smoothing, block_v, inplace)
    assert actual.dtype == dtype and actual.shape == logits.shape
    if inplace:
        assert actual.data_ptr() == logits.data_ptr()
    assert_close(actual.cpu(), expected, name="grad", terms=vocab)  # softmax over the vocabulary
    return actual


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"@{c[3]}")
@pytest.mark.parametrize("impl,dtype", IMPLS, ids=lambda v: str(v).replace("torch.", ""))
def test_stats_and_gradient_match_float64(impl, dtype, case, smoothing, device):
    if impl == "triton" and device == "cpu" and dtype == torch.float16 and case[0] > 100:
        pytest.skip("float16 covered by the smaller cases; keeps the interpreter's time down")
    run_case(impl, dtype, device, case, "normal", smoothing)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", ["huge", "offset", "negative offset", "equal", "masked"])
@pytest.mark.parametrize("impl,dtype", [("triton", torch.float32), ("triton", torch.bfloat16),
                                        ("torch", torch.float32), ("torch", torch.float64)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_numerically_hard_logits(impl, dtype, kind, device):
    """Logits of magnitude 1e4 (spread or offset), all-equal rows, and -inf columns (some rows'
    slice all -inf), in a slice that spans several blocks."""
    smoothing = 0.0 if kind == "masked" else 0.1  # smoothing over -inf logits is an inf loss
    run_case(impl, dtype, device, (64, 600, 300, 300, 128), kind, smoothing)


@pytest.mark.parametrize("kind", ["normal", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_tiling_in_the_interpreter(dtype, kind, monkeypatch):
    """The launchers' GPU tiling (one row per program, 4096-column blocks) in the interpreter,
    which by itself takes many rows per program: a middle slice of 5000 columns in 2 blocks, the
    second one partial."""
    choose = kernels._launch_config
    tilings = []

    def gpu_tiling(n_rows, n_cols, device, block_v):
        config = choose(n_rows, n_cols, torch.device("cuda"), block_v)
        tilings.append(config[:2])  # (rows per program, BLOCK_V); the interpreter ignores warps
        return config

    monkeypatch.setattr(kernels, "_launch_config", gpu_tiling)
    run_case("triton", dtype, "cpu", (7, 15000, 5000, 5000, None), kind,
             0.0 if kind == "masked" else 0.1)
    assert set(tilings) == {(1, 4096)}


@pytest.mark.parametrize("impl,dtype", [("triton", torch.float32), ("triton", torch.bfloat16),
                                        ("torch", torch.float32), ("torch", torch.bfloat16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_inplace_backward_writes_the_same_gradient_over_the_logits(impl, dtype):
    case = (19, 300, 100, 100, 32)
    out_of_place = run_case(impl, dtype, "cpu", case, "normal", 0.1)
    in_place = run_case(impl, dtype, "cpu", case, "normal", 0.1, inplace=True)
    assert torch.equal(in_place, out_of_place)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_in_row_chunks(dtype, monkeypatch):
    import parallelkit.ops.cross_entropy as op

    monkeypatch.setattr(op, "TORCH_CHUNK_ELEMENTS", 1000)  # 10 rows of 100, 1 row of 2500
    for case in [(19, 300, 100, 100, None), (7, 5000, 2500, 0, None)]:
        run_case("torch", dtype, "cpu", case, "normal", 0.1)
        run_case("torch", dtype, "cpu", case, "normal", 0.1, inplace=True)


def test_launchers_reject_what_the_kernels_cannot_take():
    x, t = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    lse = torch.zeros(4)
    for call, message in [
        (lambda: cross_entropy_stats_forward(x.double(), t), r"float32/bfloat16/float16"),
        (lambda: cross_entropy_stats_forward(x.t(), t), r"contiguous last dim"),
        (lambda: cross_entropy_stats_forward(x, t.int()), r"contiguous int64 \[4\]"),
        (lambda: cross_entropy_stats_forward(x, t, out=torch.empty(3, 4)), r"float32 \[4, 4\]"),
        (lambda: cross_entropy_backward(x, t, lse.double(), lse, lse, 0, 8), r"row_max must be"),
        (lambda: cross_entropy_backward(x, t, lse, lse, lse[:2], 0, 8), r"grad_row must be"),
        (lambda: cross_entropy_backward(x, t, lse, lse, lse, 0, 8, out=x.half()),
         r"out must be a torch.float32 \(4, 8\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


def test_reference_equals_torch_cross_entropy():
    full, targets = make_logits(40, 33)
    for smoothing in (0.0, 0.1):
        for reduction in ("mean", "sum", "none"):
            expected = torch.nn.functional.cross_entropy(
                full, targets, ignore_index=IGNORE, reduction=reduction,
                label_smoothing=smoothing)
            actual = cross_entropy_reference(full, targets, smoothing, IGNORE, reduction)
            torch.testing.assert_close(actual, expected, **tolerance(torch.float64, len(full)))
    all_ignored = torch.full_like(targets, IGNORE)
    assert cross_entropy_reference(full, all_ignored).isnan()


@pytest.mark.parametrize("logits,targets,kwargs,error,message", [
    (torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, dtype=torch.long), {}, TypeError,
     r"logits must be floating point .* got torch.int64"),
    (torch.zeros(4, 8), torch.zeros(4), {}, TypeError,
     r"targets must be integer class ids, got torch.float32; pass targets.long\(\)"),
    (torch.zeros(4, 8, device="meta"), torch.zeros(4, dtype=torch.long), {}, ValueError,
     r"logits are on meta but targets on cpu; move targets with targets.to\('meta'\)"),
    (torch.zeros(2, 3, 8), torch.zeros(3, 2, dtype=torch.long), {}, ValueError,
     r"targets' shape \(3, 2\) as leading dims \(class dim last\), got logits \(2, 3, 8\)"),
    (torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), {"label_smoothing": 1.0}, ValueError,
     r"label_smoothing=1.0 must be in \[0, 1\)"),
    (torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), {"label_smoothing": -0.1}, ValueError,
     r"label_smoothing=-0.1 must be in \[0, 1\)"),
    (torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), {"reduction": "avg"}, ValueError,
     r"reduction='avg' must be one of \('mean', 'sum', 'none'\)"),
])
def test_bad_input_is_rejected_before_any_communication(logits, targets, kwargs, error, message):
    # Targets out of range need the group's size: tests/distributed checks those.
    with pytest.raises(error, match=message):
        vocab_parallel_cross_entropy(logits, targets, **kwargs)
