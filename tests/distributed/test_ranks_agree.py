"""Ranks that disagree on a size raise the same clear error on every rank instead of aborting
(gloo: "Received data size doesn't match expected size") or hanging: comm's ranks-agree check,
each op that calls it at entry, mpu.initialize, and the pipeline executor. Also the switch
(PARALLELKIT_CHECK_COLLECTIVES / comm.validation), and vocab-parallel cross-entropy over uneven
vocabulary slices, which is now computed exactly instead of rejected."""

import dataclasses
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallelkit import mpu
from parallelkit.context_parallel.attention import ContextParallelAttention
from parallelkit.distributed import comm
from parallelkit.ops.cross_entropy import vocab_parallel_cross_entropy
from parallelkit.ops.norms import parallel_layer_norm
from parallelkit.ops.overlap import all_gather_matmul, matmul_reduce_scatter
from parallelkit.pipeline_parallel import PipelineStage
from parallelkit.pipeline_parallel.actions import ScheduleError
from parallelkit.pipeline_parallel.check import check_schedule
from parallelkit.pipeline_parallel.execute import run_schedule
from parallelkit.pipeline_parallel.schedules import build_schedule
from parallelkit.tensor_parallel.norms import ParallelLayerNorm, ParallelRMSNorm
from parallelkit.testing import run_on_ranks
from parallelkit.testing.backends import local_backend

TIMEOUT = 30


def raised(call) -> tuple[str, str]:
    """(exception type name, message) of ``call()``, or ("", "") when it returns."""
    try:
        call()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "", ""


def assert_every_rank_raised(results, error: type, *patterns: str) -> None:
    """Each rank's (type, message) is ``error`` and its message matches every pattern."""
    for rank, (kind, message) in enumerate(results):
        assert kind == error.__name__, f"rank {rank}: {kind or 'no error'}: {message}"
        for pattern in patterns:
            assert re.search(pattern, message), f"rank {rank}: {pattern!r} not in {message!r}"


# ------------------------------------------------------------------------------ comm itself
def _check_ranks_agree():
    rank = torch.distributed.get_rank()
    group = torch.distributed.group.WORLD
    comm.check_ranks_agree(group, "same", shape=(3, 4), dtype=torch.float32)  # no error
    results = {
        "shape": raised(lambda: comm.check_ranks_agree(
            group, "my_op", ranks="test", fix="pass equal shapes",
            input_shape=torch.Size([6, 2] if rank == 0 else [4, 2, 1]), dtype=torch.float32)),
        "local": raised(lambda: comm.check_ranks_agree(
            group, "my_op", check=lambda: _fail_on(rank, 1), shape=(3,))),
        "op": raised(lambda: comm.check_ranks_agree(group, f"op{rank}", shape=(3,))),
    }
    with comm.validation(False):  # off: equal values pass without a collective, checks still run
        assert not comm.validation_enabled(group)
        comm.check_ranks_agree(group, "off", shape=(rank,))
        results["off"] = raised(lambda: comm.check_ranks_agree(
            group, "off", check=lambda: _fail_on(rank, rank), shape=(3,)))
    assert comm.validation_enabled(group)  # gloo: on by default
    return results


def _fail_on(rank, failing):
    if rank == failing:
        raise TypeError(f"rank {rank}'s input is bad")


def test_check_ranks_agree_names_every_rank_on_every_rank():
    results = run_on_ranks(_check_ranks_agree, 2, timeout=TIMEOUT)
    assert_every_rank_raised(
        [r["shape"] for r in results], ValueError,
        re.escape("my_op: test ranks disagree on the input shape: rank 0 has (6, 2), rank 1 has "
                  "(4, 2, 1); pass equal shapes"))
    # the failing rank re-raises its own error; the other raises the same type, naming it
    assert results[1]["local"] == ("TypeError", "rank 1's input is bad")
    assert_every_rank_raised([results[0]["local"]], TypeError,
                             r"my_op: rank 1 rejected its input, so every rank stops here rather "
                             r"than wait for it: TypeError: rank 1's input is bad")
    assert_every_rank_raised([r["op"] for r in results], ValueError,
                             r"ranks are in different operations: rank 0 in op0, rank 1 in op1")
    assert results[0]["off"] == ("TypeError", "rank 0's input is bad")
    assert results[1]["off"] == ("TypeError", "rank 1's input is bad")


def _comm_helpers():
    rank = torch.distributed.get_rank()
    group = torch.distributed.group.WORLD
    x = torch.ones(2 if rank == 0 else 4, 4)
    return [raised(lambda: comm.all_gather(x, 0, group)),
            raised(lambda: comm.all_reduce(x, group)),
            raised(lambda: comm.reduce_scatter(x, 0, group)),
            raised(lambda: comm.all_to_all(x.T.contiguous(), 0, 1, group)),
            raised(lambda: comm.all_reduce(torch.ones(3, dtype=torch.float64 if rank else None),
                                           group)),
            raised(lambda: comm.all_gather(torch.ones(4, 2) if rank else torch.ones(4), 0, group))]


def test_comm_collectives_reject_unequal_tensors_on_every_rank():
    per_rank = run_on_ranks(_comm_helpers, 2, timeout=TIMEOUT)
    for i, name in enumerate(["all_gather", "all_reduce", "reduce_scatter", "all_to_all"]):
        shapes = "rank 0 has (2, 4), rank 1 has (4, 4)" if i < 3 else \
            "rank 0 has (4, 2), rank 1 has (4, 4)"
        assert_every_rank_raised([r[i] for r in per_rank], ValueError,
                                 rf"comm.{name}: ranks disagree on the shape: {re.escape(shapes)}",
                                 r"every member must pass a tensor of the same shape and dtype")
    assert_every_rank_raised([r[4] for r in per_rank], ValueError,
                             r"disagree on the dtype: rank 0 has torch.float32, rank 1 has "
                             r"torch.float64")
    assert_every_rank_raised([r[5] for r in per_rank], ValueError,
                             re.escape("the shape: rank 0 has (4,), rank 1 has (4, 2)"))


def _async_buckets():
    rank = torch.distributed.get_rank()
    group = torch.distributed.group.WORLD
    buffer = torch.ones(6 if rank == 0 else 8)
    return [raised(lambda: comm.all_reduce_async_(buffer, group).wait()),
            raised(lambda: comm.reduce_scatter_async(buffer, torch.empty(len(buffer) // 2),
                                                     group).wait()),
            raised(lambda: comm.all_gather_async_(buffer, group).wait()),
            raised(lambda: comm.all_reduce_async_(torch.ones(4, 2) if rank else torch.ones(8),
                                                  group))]


def test_bucket_collectives_reject_unequal_buffers_on_every_rank():
    per_rank = run_on_ranks(_async_buckets, 2, timeout=TIMEOUT)
    for i, name in enumerate(["all_reduce_async_", "reduce_scatter_async", "all_gather_async_"]):
        assert_every_rank_raised([r[i] for r in per_rank], ValueError, re.escape(
            f"comm.{name}: ranks disagree on the shape: rank 0 has (6,), rank 1 has (8,)"))
    assert per_rank[1][3] == ("ValueError", "all_reduce_async_ needs a contiguous 1-D buffer, got "
                                            "shape (4, 2) (contiguous=True)")
    assert_every_rank_raised([per_rank[0][3]], ValueError, r"rank 1 rejected its input")


def _switch():
    group = torch.distributed.group.WORLD
    before = os.environ.get(comm.CHECK_ENV)
    try:
        os.environ[comm.CHECK_ENV] = "0"
        off = comm.validation_enabled(group)
        with comm.validation(True):
            inner = comm.validation_enabled(group)
        os.environ[comm.CHECK_ENV] = "1"
        on = comm.validation_enabled(group)
        os.environ[comm.CHECK_ENV] = "yes"
        bad = raised(lambda: comm.validation_enabled(group))
    finally:
        if before is None:
            os.environ.pop(comm.CHECK_ENV, None)
        else:
            os.environ[comm.CHECK_ENV] = before
    return off, inner, on, bad


def test_the_switch_env_var_and_context_manager():
    off, inner, on, bad = run_on_ranks(_switch, 2, timeout=TIMEOUT)[0]
    assert (off, inner, on) == (False, True, True)
    assert bad[0] == "ValueError" and "PARALLELKIT_CHECK_COLLECTIVES='yes' must be 0" in bad[1]


# ------------------------------------------------------------------------------ the ops
def _norms():
    state = mpu.initialize(tp=2)
    rank = state.tp.rank
    x = torch.randn(6 if rank == 0 else 4, 2, 16)
    rms, layer = ParallelRMSNorm(32), ParallelLayerNorm(32)
    same = torch.randn(3, 16)
    return [raised(lambda: rms(x)), raised(lambda: layer(x)),
            raised(lambda: layer(same.double() if rank else same)),
            raised(lambda: parallel_layer_norm(same.long() if rank else same, None, None))]


def test_parallel_norms_with_unequal_token_counts_or_dtypes():
    per_rank = run_on_ranks(_norms, 2, timeout=TIMEOUT)
    tokens = re.escape("tensor-parallel ranks disagree on the input shape: rank 0 has (6, 2, 16), "
                       "rank 1 has (4, 2, 16); every TP rank must pass the same tokens (same "
                       "sequence length and batch)")
    assert_every_rank_raised([r[0] for r in per_rank], ValueError, "^ParallelRMSNorm: " + tokens)
    assert_every_rank_raised([r[1] for r in per_rank], ValueError, "^ParallelLayerNorm: " + tokens)
    assert_every_rank_raised([r[2] for r in per_rank], ValueError,
                             r"disagree on the dtype: rank 0 has torch.float32, rank 1 has "
                             r"torch.float64")
    # one rank's own input check fails: every rank raises its type
    assert_every_rank_raised([r[3] for r in per_rank], TypeError, r"x has dtype torch.int64")
    assert "rank 1 rejected its input" in per_rank[0][3][1]


def _context_parallel(mode):
    state = mpu.initialize(cp=2)
    rank = state.cp.rank
    attention = ContextParallelAttention(mode=mode)

    def qkv(s=4, b=1, heads=2, d=8, dtype=torch.float32):
        return [torch.randn(b, heads, s, d, dtype=dtype) for _ in range(3)]

    return [raised(lambda: attention(*qkv(s=4 if rank == 0 else 2))),
            raised(lambda: attention(*qkv(b=1 + rank))),
            raised(lambda: attention(*qkv(heads=2 + 2 * rank))),
            raised(lambda: attention(*qkv(d=8 + rank))),
            raised(lambda: attention(*qkv(dtype=torch.float64 if rank else torch.float32))),
            raised(lambda: attention(*qkv(s=3 if rank else 4)))]  # 6 tokens: not a multiple of 4


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_context_parallel_attention_with_unequal_shapes(mode):
    per_rank = run_on_ranks(_context_parallel, 2, mode, timeout=TIMEOUT)
    what = re.escape(f"ContextParallelAttention ({mode}_attention): context-parallel ranks "
                     "disagree on the q shape: ")
    fix = r"every CP rank must pass q, k, v for its s/cp tokens of the same batch"
    for i, q_shapes in enumerate(["(1, 2, 4, 8), rank 1 has (1, 2, 2, 8)",
                                  "(1, 2, 4, 8), rank 1 has (2, 2, 4, 8)",
                                  "(1, 2, 4, 8), rank 1 has (1, 4, 4, 8)",
                                  "(1, 2, 4, 8), rank 1 has (1, 2, 4, 9)"]):
        assert_every_rank_raised([r[i] for r in per_rank], ValueError,
                                 what + "rank 0 has " + re.escape(q_shapes), "k shape", fix)
    assert_every_rank_raised([r[4] for r in per_rank], ValueError,
                             r"disagree on the dtype: rank 0 has torch.float32, rank 1 has "
                             r"torch.float64")
    # rank 1's 3 tokens fail its own check: it raises that, and rank 0 names it
    assert_every_rank_raised([r[5] for r in per_rank], ValueError, r"a sequence of 6 tokens")
    assert re.search(r"context-parallel rank 1 rejected its input, so every rank stops here",
                     per_rank[0][5][1])


def _overlap():
    group = mpu.initialize(tp=2).tp.group
    rank = torch.distributed.get_rank(group)
    w = torch.randn(6, 8)
    return [raised(lambda: all_gather_matmul(torch.randn(4 if rank == 0 else 2, 8), w, group)),
            raised(lambda: matmul_reduce_scatter(torch.randn(4 if rank == 0 else 6, 8), w, group)),
            raised(lambda: matmul_reduce_scatter(torch.randn(4, 8), torch.randn(6 + rank, 8),
                                                 group)),
            raised(lambda: all_gather_matmul(torch.randn(4, 8), w, group, 1 + rank))]


def test_overlapped_matmuls_with_unequal_rows():
    per_rank = run_on_ranks(_overlap, 2, timeout=TIMEOUT)
    assert_every_rank_raised([r[0] for r in per_rank], ValueError, re.escape(
        "all_gather_matmul: tensor-parallel ranks disagree on the x shape: rank 0 has (4, 8), "
        "rank 1 has (2, 8)"))
    assert_every_rank_raised([r[1] for r in per_rank], ValueError, re.escape(
        "matmul_reduce_scatter: tensor-parallel ranks disagree on the token dims: rank 0 has "
        "(4,), rank 1 has (6,)"))
    assert_every_rank_raised([r[2] for r in per_rank], ValueError, re.escape(
        "the output features: rank 0 has (6,), rank 1 has (7,)"))
    assert_every_rank_raised([r[3] for r in per_rank], ValueError, re.escape(
        "the chunks per rank: rank 0 has 1, rank 1 has 2"))


def _cross_entropy_unequal_tokens():
    rank = mpu.initialize(tp=2).tp.rank
    tokens = 5 if rank == 0 else 3
    return raised(lambda: vocab_parallel_cross_entropy(torch.randn(tokens, 8),
                                                       torch.zeros(tokens, dtype=torch.long)))


def test_cross_entropy_with_unequal_token_counts():
    assert_every_rank_raised(
        run_on_ranks(_cross_entropy_unequal_tokens, 2, timeout=TIMEOUT), ValueError,
        re.escape("vocab_parallel_cross_entropy: tensor-parallel ranks disagree on the token "
                  "shape: rank 0 has (5,), rank 1 has (3,)"))


VOCAB_SLICES = [10, 6, 13]  # uneven, none a power of two; V = 29


def _uneven_vocabulary(backend_name, dtype, give_sizes):
    rank = mpu.initialize(tp=3).tp.rank
    g = torch.Generator().manual_seed(0)
    vocab = sum(VOCAB_SLICES)
    full = (3 * torch.randn(4, 3, vocab, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, vocab, (4, 3), generator=g)
    targets.view(-1)[::5] = -100
    start = sum(VOCAB_SLICES[:rank])
    results = []
    for smoothing in (0.0, 0.1):
        shard = full[..., start:start + VOCAB_SLICES[rank]].clone().requires_grad_()
        with local_backend(backend_name):
            loss = vocab_parallel_cross_entropy(
                shard, targets, label_smoothing=smoothing,
                vocab_sizes=VOCAB_SLICES if give_sizes else None)
            loss.backward()
        dense = full.to(torch.float64, copy=True).requires_grad_()
        expected = F.cross_entropy(dense.flatten(0, 1), targets.flatten(),
                                   label_smoothing=smoothing)
        expected.backward()
        grad = dense.grad[..., start:start + VOCAB_SLICES[rank]]
        results.append(((loss.double() - expected).abs().item(),
                        (shard.grad.double() - grad).abs().max().item()))
    return results


@pytest.mark.parametrize("give_sizes", [False, True], ids=["learned", "given"])
@pytest.mark.parametrize("backend_name,dtype", [("torch", torch.float64),
                                                ("triton", torch.float32)])
def test_cross_entropy_over_uneven_vocabulary_slices(backend_name, dtype, give_sizes):
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for per_smoothing in run_on_ranks(_uneven_vocabulary, 3, backend_name, dtype, give_sizes,
                                      timeout=60):
        for loss_error, grad_error in per_smoothing:
            assert loss_error < tolerance and grad_error < tolerance


def _uneven_vocabulary_errors():
    rank = mpu.initialize(tp=2).tp.rank
    logits = torch.randn(3, 8 if rank == 0 else 5)
    return [raised(lambda: vocab_parallel_cross_entropy(logits, torch.tensor([0, 13, 2]))),
            raised(lambda: vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 2]),
                                                        vocab_sizes=[8, 8]))]


def test_uneven_vocabulary_errors_name_the_slices():
    per_rank = run_on_ranks(_uneven_vocabulary_errors, 2, timeout=TIMEOUT)
    assert_every_rank_raised([r[0] for r in per_rank], IndexError, re.escape(
        "targets must be class ids in [0, 13) (slices of 8, 5 over tp 2) or ignore_index=-100; "
        "got 13 at flattened position 1"))
    assert_every_rank_raised([r[1] for r in per_rank], ValueError,
                             re.escape("vocab_sizes=[8, 8] must list the 2 TP ranks' slice sizes"))


# ------------------------------------------------------------------------------ pipeline
# (mpu.initialize's own agreement check is tested in test_mpu.py.)
SEQ, BATCH, HIDDEN = 2, 4, 4


def _stage_and_batch():
    torch.manual_seed(0)
    stage = PipelineStage([nn.Linear(HIDDEN, HIDDEN)], lambda y, t: (y - t).square().mean())
    return stage, torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)


def without(schedule, rank, index):
    """``schedule`` with action ``index`` of ``rank`` removed."""
    actions = list(schedule.actions)
    actions[rank] = actions[rank][:index] + actions[rank][index + 1:]
    return dataclasses.replace(schedule, actions=tuple(actions))


def _missing_actions():
    mpu.initialize(pp=2)
    stage, inputs, targets = _stage_and_batch()
    schedule, shape = build_schedule("1f1b", 2, 2), (SEQ, BATCH // 2, HIDDEN)
    return [raised(lambda: run_schedule(without(schedule, rank, index), stage, inputs, targets,
                                        shape))
            for rank in range(2) for index in range(len(schedule.actions[rank]))]


def test_pipeline_executor_rejects_a_schedule_with_a_missing_action():
    """Each one action removed in turn: the checker's error on both ranks, no hang."""
    per_rank = run_on_ranks(_missing_actions, 2, timeout=TIMEOUT)
    schedule = build_schedule("1f1b", 2, 2)
    removals = [(rank, index) for rank in range(2) for index in range(len(schedule.actions[rank]))]
    for case, (rank, index) in enumerate(removals):
        with pytest.raises(ScheduleError) as expected:
            check_schedule(without(schedule, rank, index))
        assert_every_rank_raised([r[case] for r in per_rank], ScheduleError,
                                 "^" + re.escape(str(expected.value)) + "$")
    messages = [per_rank[0][case][1] for case in range(len(removals))]
    assert "1f1b: rank 1 SEND_B1: sends a tensor not computed yet" in messages  # B1 removed
    assert any(m.startswith("1f1b (pp=2, m=2) deadlocks") for m in messages)


def _pipeline(case):
    rank = mpu.initialize(pp=2).pp.rank
    stage, inputs, targets = _stage_and_batch()
    m = 2
    schedule, shape = build_schedule("1f1b", 2, m), (SEQ, BATCH // m, HIDDEN)
    if case == "microbatches":
        m = 2 * (1 + rank)
        schedule, shape = build_schedule("1f1b", 2, m), (SEQ, BATCH // m, HIDDEN)
    elif case == "shape":
        shape = (SEQ, BATCH // m, HIDDEN + rank)
    elif case == "inputs":
        inputs = None
    return raised(lambda: run_schedule(schedule, stage, inputs, targets, shape))


@pytest.mark.parametrize("case,message", [
    ("microbatches", r"run_schedule: pipeline-parallel ranks disagree on the microbatches: rank 0 "
                     r"has 2, rank 1 has 4"),
    ("shape", r"disagree on the activation shape: rank 0 has \(2, 2, 4\), rank 1 has \(2, 2, 5\)"),
    ("inputs", r"rank 0 rejected its input, so every rank stops here .* rank 0 runs global stage "
               r"0 and needs the inputs"),
])
def test_pipeline_ranks_that_disagree_raise_together(case, message):
    results = run_on_ranks(_pipeline, 2, case, timeout=TIMEOUT)
    if case == "inputs":  # rank 0 raises its own error, rank 1 names it
        assert results[0][0] == "ValueError" and "needs the inputs" in results[0][1]
        results = results[1:]
    assert_every_rank_raised(results, ValueError, message)


def _a_good_step_still_runs():
    return _pipeline("none")


def test_a_good_schedule_still_runs():
    assert run_on_ranks(_a_good_step_still_runs, 2, timeout=TIMEOUT) == [("", "")] * 2


# ------------------------------------------------------------------------------ cost
def _gathers_per_call():
    """Single-tensor all-gathers (the check's, and the ops' own) per forward + backward."""
    state = mpu.initialize(tp=2, cp=1)
    counts = {}
    original = comm._all_gather_single

    def counting(*args, **kwargs):
        counts[key] += 1
        return original(*args, **kwargs)

    comm._all_gather_single = counting
    try:
        for enabled in (True, False):
            with comm.validation(enabled):
                key = ("rms", enabled)
                counts[key] = 0
                x = torch.randn(4, 8, requires_grad=True)
                ParallelRMSNorm(16)(x).sum().backward()
                key = ("layer", enabled)
                counts[key] = 0
                ParallelLayerNorm(16)(x).sum().backward()
                key = ("cross_entropy", enabled)
                counts[key] = 0
                logits = torch.randn(4, 8, requires_grad=True)
                vocab_parallel_cross_entropy(logits, torch.arange(4)).backward()
                key = ("cross_entropy given sizes", enabled)
                counts[key] = 0
                vocab_parallel_cross_entropy(logits, torch.arange(4), vocab_sizes=[8, 8])
    finally:
        comm._all_gather_single = original
    assert state.tp.size == 2
    return counts


def test_one_check_per_op_call_and_none_when_off():
    counts = run_on_ranks(_gathers_per_call, 2, timeout=TIMEOUT)[0]
    # The norm layers add one exchange at their entry (their own input checks, so that a bad
    # input on one rank raises on all); the op adds one; LayerNorm's statistics one all-gather.
    assert counts == {("rms", True): 2, ("layer", True): 3, ("cross_entropy", True): 2,
                      ("cross_entropy given sizes", True): 1,
                      ("rms", False): 0, ("layer", False): 1, ("cross_entropy", False): 1,
                      ("cross_entropy given sizes", False): 0}


def _one_rank_passes_the_full_hidden():
    from parallelkit.tensor_parallel import ParallelRMSNorm

    state = mpu.initialize(tp=2)
    norm = ParallelRMSNorm(8)
    x = torch.randn(3, 8 if state.tp.rank == 1 else 4)
    with pytest.raises(ValueError) as caught:
        norm(x)
    return str(caught.value)


def test_a_layer_input_bad_on_one_rank_raises_on_every_rank():
    mine, other = run_on_ranks(_one_rank_passes_the_full_hidden, 2, timeout=30)
    assert "expects this rank's hidden slice [..., 4], got shape (3, 8)" in other
    assert "rank 1" in mine


def _one_rank_bad_linear_and_embedding_input():
    from parallelkit.tensor_parallel import RowParallelLinear, VocabParallelEmbedding

    state = mpu.initialize(tp=2)
    row = RowParallelLinear(8, 8, input_is_parallel=True)
    dtype = torch.float64 if state.tp.rank == 0 else torch.float32
    with pytest.raises(TypeError) as wrong_dtype:
        row(torch.randn(3, 4, dtype=dtype))
    embedding = VocabParallelEmbedding(8, 4)
    with pytest.raises(IndexError) as out_of_range:
        embedding(torch.tensor([[9 if state.tp.rank == 1 else 1]]))
    return str(wrong_dtype.value), str(out_of_range.value)


def test_a_linear_or_embedding_input_bad_on_one_rank_raises_on_every_rank():
    (dtype_0, ids_0), (dtype_1, ids_1) = run_on_ranks(_one_rank_bad_linear_and_embedding_input,
                                                      2, timeout=30)
    assert "torch.float32 parameters but got a torch.float64 input" in dtype_0
    assert "rank 0" in dtype_1
    assert "token ids must be in [0, 8), got min 9" in ids_1
    assert "rank 1" in ids_0
