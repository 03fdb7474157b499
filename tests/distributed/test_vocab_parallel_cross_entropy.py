"""vocab_parallel_cross_entropy on 1, 2 and 4 TP ranks against F.cross_entropy on the full logits:
the loss and each rank's slice of the gradient, on the torch path and on the Triton kernels
(interpreter); what it communicates; bad input that needs the group to be caught.

Every rank draws the same full logits from one seed and keeps its vocabulary slice, so the
single-process answer is computed on every rank with no communication.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import parallelkit.kernels.cross_entropy as kernels
from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.ops.cross_entropy import REDUCTIONS, vocab_parallel_cross_entropy
from parallelkit.reference.cross_entropy import cross_entropy_reference
from parallelkit.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from parallelkit.testing import run_on_ranks
from parallelkit.testing.backends import local_backend
from parallelkit.testing.tolerances import assert_close

SEQ, BATCH, VOCAB = 6, 3, 96  # [s, b, V]: V/4 = 24 is not a power of two
IGNORE = -100


def full_problem(dtype, kind="normal", seed=0):
    """The same on every rank: logits [s, b, V] (rounded to dtype), targets [s, b] with every
    4th ignored, and an upstream gradient for reduction='none'."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, VOCAB, generator=g, dtype=torch.float64)
    x = {"normal": 3 * x, "huge": 1e4 * x, "offset": 1e4 + x, "equal": torch.zeros_like(x)}[kind]
    targets = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    targets.view(-1)[::4] = IGNORE
    return x.to(dtype), targets, torch.rand(SEQ, BATCH, generator=g, dtype=torch.float64)


@contextlib.contextmanager
def kernel_launches():
    """Counts calls of the kernel launchers (the op imports them from the module when it runs)."""
    calls = []
    originals = {name: getattr(kernels, name)
                 for name in ("cross_entropy_stats_forward", "cross_entropy_backward")}

    def counting(name):
        return lambda *args, **kwargs: calls.append(name) or originals[name](*args, **kwargs)

    for name in originals:
        setattr(kernels, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)


def check_one(state, full, targets, upstream, smoothing, reduction, inplace, module=False):
    """Loss and this rank's gradient slice vs F.cross_entropy and the reference (float64)."""
    tp, rank = state.tp.size, state.tp.rank
    shard = full.chunk(tp, -1)[rank].clone().requires_grad_()
    options = dict(label_smoothing=smoothing, ignore_index=IGNORE, reduction=reduction)
    with comm.count_traffic() as forward_traffic:
        if module:
            loss = VocabParallelCrossEntropy(**options, inplace_backward=inplace)(shard, targets)
        else:
            loss = vocab_parallel_cross_entropy(shard, targets, **options,
                                                inplace_backward=inplace)
    grad_loss = upstream if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    with comm.count_traffic() as backward_traffic:
        loss.backward(grad_loss.to(loss.dtype))

    dense = full.to(torch.float64, copy=True).requires_grad_()
    expected = F.cross_entropy(dense.flatten(0, 1), targets.flatten(), **options)
    expected = expected.view(targets.shape) if reduction == "none" else expected
    expected.backward(grad_loss)
    reference = cross_entropy_reference(full, targets, smoothing, IGNORE, reduction)
    what = f"tp={tp} {full.dtype} ε={smoothing} {reduction} inplace={inplace}"
    accumulate = torch.float64 if full.dtype == torch.float64 else torch.float32
    assert loss.dtype == accumulate and loss.shape == expected.shape, what
    # Reductions: the softmax over the vocabulary, the mean over the tokens.
    terms = VOCAB + targets.numel()
    assert_close(loss, expected, name=what, terms=terms)
    assert_close(loss, reference, name=what, terms=terms)
    assert shard.grad.dtype == full.dtype, what
    assert_close(shard.grad, dense.grad.chunk(tp, -1)[rank], name=what, terms=terms)

    # Forward: one max all-reduce of [T] and one sum all-reduce of [k, T]; backward: nothing.
    tokens, size = targets.numel(), torch.finfo(accumulate).bits // 8
    expected_bytes = tokens * size * (1 + (3 if smoothing else 2)) if tp > 1 else 0
    assert dict(forward_traffic.calls) == ({"all_reduce": 2} if tp > 1 else {}), what
    assert forward_traffic.payload["all_reduce"] == expected_bytes, what
    assert not backward_traffic.calls, what
    return loss.detach()


def _parity(tp, backend_name, dtype):
    state = mpu.initialize(tp=tp)
    full, targets, upstream = full_problem(dtype)
    with local_backend(backend_name), kernel_launches() as launched:
        for smoothing in (0.0, 0.1):
            for reduction in REDUCTIONS:
                for inplace in (False, True):
                    check_one(state, full, targets, upstream, smoothing, reduction, inplace)
        loss = check_one(state, full, targets, upstream, 0.1, "mean", False, module=True)
    uses_kernels = backend_name == "triton" and dtype != torch.float64
    assert len(launched) == (26 if uses_kernels else 0)  # 13 forwards and backwards
    return loss.item()


CONFIGS = [(2, 2), (4, 1), (4, 2), (4, 4)]  # (world size, tp): dp = world / tp
BACKENDS = [("torch", torch.float64), ("torch", torch.float32),
            ("triton", torch.float32), ("triton", torch.bfloat16)]


@pytest.mark.parametrize("backend_name,dtype", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("world,tp", CONFIGS, ids=lambda v: str(v))
def test_loss_and_gradient_match_cross_entropy_on_full_logits(world, tp, backend_name, dtype):
    losses = run_on_ranks(_parity, world, tp, backend_name, dtype, timeout=120)
    assert len(set(losses)) == 1  # every rank computed the same loss


def _hard_logits(kind, backend_name):
    state = mpu.initialize(tp=2)
    full, targets, upstream = full_problem(torch.float32, "normal" if kind == "masked" else kind)
    if kind == "masked":  # vocabulary padding: -inf columns; rank 1's whole slice on some rows
        full[..., VOCAB // 2:] = float("-inf")
        full[0, :, :VOCAB // 2 - 3] = float("-inf")
        targets[targets >= VOCAB // 2 - 3] = VOCAB // 2 - 1  # finite on every row
        targets[0, 1:] = VOCAB // 2 - 1
    smoothing_values = (0.0,) if kind == "masked" else (0.0, 0.1)  # smoothing over -inf: inf
    with local_backend(backend_name):
        for smoothing in smoothing_values:
            for reduction in ("mean", "none"):
                check_one(state, full, targets, upstream, smoothing, reduction, False)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["huge", "offset", "equal", "masked"])
def test_numerically_hard_logits_across_ranks(kind, backend_name):
    """1e4 * N(0, 1), 1e4 + N(0, 1) and all-equal logits in float32, and -inf padding that
    leaves one rank's slice of some rows all -inf: the combine step must stay exact."""
    run_on_ranks(_hard_logits, 2, kind, backend_name, timeout=120)


def _all_ignored_and_empty():
    mpu.initialize(tp=2)
    shard = torch.randn(3, VOCAB // 2, requires_grad=True)
    ignored = torch.full((3,), IGNORE)
    assert vocab_parallel_cross_entropy(shard, ignored).isnan()  # 0 / 0, as F.cross_entropy
    assert vocab_parallel_cross_entropy(shard, ignored, reduction="sum") == 0
    empty = vocab_parallel_cross_entropy(torch.randn(0, 4, VOCAB // 2), torch.zeros(0, 4).long(),
                                         reduction="none")
    assert empty.shape == (0, 4)


def test_all_rows_ignored_and_no_rows():
    run_on_ranks(_all_ignored_and_empty, 2, timeout=60)


def _permuted_logits():
    """Logits that are a permuted view ([b, s, V/tp] of an [s, b, V/tp] result, as a
    sequence-parallel head returns them): per-token losses in the view's order, and the logits'
    gradient, equal F.cross_entropy's on the same view, in float64."""
    state = mpu.initialize(tp=2)
    full = torch.randn(SEQ, BATCH, VOCAB, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    view = full.transpose(0, 1)  # [b, s, V], not contiguous
    shard = view.chunk(2, -1)[state.tp.rank].detach().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, reduction="none")
    reference = view.detach().requires_grad_()
    expected = F.cross_entropy(reference.flatten(0, 1), targets.flatten(),
                               reduction="none").view(BATCH, SEQ)
    assert loss.shape == (BATCH, SEQ)
    assert_close(loss, expected, name="per-token loss", terms=VOCAB)
    weights = torch.rand(BATCH, SEQ, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (loss * weights).sum().backward()
    (expected * weights).sum().backward()
    assert_close(shard.grad, reference.grad.chunk(2, -1)[state.tp.rank], name="grad", terms=VOCAB)


def test_permuted_logits_keep_their_token_order():
    run_on_ranks(_permuted_logits, 2, timeout=60)


def _bad_input(backend_name):
    mpu.initialize(tp=2)
    shard = torch.randn(4, 8)  # V = 16 over two ranks
    with local_backend(backend_name):
        for targets, shown in [([0, 16, 1, 2], r"got 16 at flattened position 1"),
                               ([0, 1, -1, 2], r"got -1 at flattened position 2")]:
            with pytest.raises(IndexError, match=r"targets must be class ids in \[0, 16\) "
                               r"\(V_local 8 x tp 2\) or ignore_index=-100; " + shown):
                vocab_parallel_cross_entropy(shard, torch.tensor(targets))
        with pytest.raises(IndexError, match=r"ignore_index=3; got -100"):
            vocab_parallel_cross_entropy(shard, torch.tensor([0, -100, 3, 2]), ignore_index=3)
        with pytest.raises(ValueError, match=r"label_smoothing=1 must be in \[0, 1\)"):
            VocabParallelCrossEntropy(label_smoothing=1)
        with pytest.raises(ValueError, match=r"reduction='batchmean' must be one of"):
            VocabParallelCrossEntropy(reduction="batchmean")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_bad_input_is_rejected_on_every_rank(backend_name):
    run_on_ranks(_bad_input, 2, backend_name, timeout=60)


def test_without_a_group_or_mpu_the_error_says_what_to_do():
    with pytest.raises(ValueError, match=r"parallelkit.mpu is not initialized"):
        vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
