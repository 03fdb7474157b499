"""The fused ring matmuls against the unfused path (collective, then matmul), forward and backward,
over each CPU ring transport (c10d: gloo's send/recv; shm: the slot protocol in shared memory)."""

import pytest
import torch
import torch.nn.functional as F

from parallelkit import mpu
from parallelkit._native import native
from parallelkit.distributed import mappings
from parallelkit.ops import ring_transport
from parallelkit.ops.overlap import (all_gather_matmul, all_gather_matmul_and_input,
                                    matmul_reduce_scatter)
from parallelkit.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close


def seeded(shape, dtype, seed):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _compare(op, tp, s, b, k, n, dtype, chunks, transport="auto"):
    """op's output and input/weight gradients vs the unfused reference, on this rank; the fused
    op (forward and backward) runs on `transport`."""
    state = mpu.initialize(tp=tp)
    group, rank = state.tp.group, state.tp.rank
    if op == "all_gather_matmul":  # x [s/tp, b, k] shard, weight [n, k]
        x = seeded((s, b, k), dtype, 1).chunk(tp)[rank]
        weight = seeded((n, k), dtype, 2 + rank)
        fused = lambda x, w: all_gather_matmul(x, w, group, chunks)  # noqa: E731
        unfused = lambda x, w: F.linear(mappings.gather_from_sp_region(x, group), w)  # noqa: E731
    else:  # x [s, b, k/tp], weight [n, k/tp]
        x = seeded((s, b, k), dtype, 1 + rank)
        weight = seeded((n, k), dtype, 2 + rank)
        fused = lambda x, w: matmul_reduce_scatter(x, w, group, chunks)  # noqa: E731
        unfused = lambda x, w: mappings.reduce_scatter_to_sp_region(F.linear(x, w), group)  # noqa: E731
    # Reduction lengths: y sums over k (all ranks' k for the reduce-scatter), grad x over n, grad
    # weight over the tokens.
    k_total = k if op == "all_gather_matmul" else k * tp
    terms = {"y": k_total, "grad x": n, "grad weight": s * b}
    results = []
    for fn in (fused, unfused):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        with ring_transport.use(transport), ring_transport.count_transports() as used:
            y = fn(xi, wi)
            y.backward(seeded(y.shape, dtype, 10 + rank))
        results.append((y.detach(), xi.grad, wi.grad))
        if fn is fused:  # forward and backward: one ring op each, on the transport asked for
            want = ring_transport.choose(group, x.device) if transport == "auto" else transport
            assert sorted(used.items()) == sorted({(op, want): 1, (other[op], want): 1}.items())
    for name, got, want in zip(("y", "grad x", "grad weight"), *results):
        assert got.shape == want.shape, name
        assert_close(got, want, name=f"{op} {name}", terms=terms[name])


other = {"all_gather_matmul": "matmul_reduce_scatter", "matmul_reduce_scatter": "all_gather_matmul"}


@pytest.mark.parametrize("transport", ["c10d", "shm"])
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
@pytest.mark.parametrize("s, b, k, n", [(8, 2, 16, 12), (16, 3, 8, 5)])
def test_fused_equals_unfused(op, tp, dtype, chunks, s, b, k, n, transport):
    run_on_ranks(_compare, 4, op, tp, s, b, k, n, dtype, chunks, transport)


def _gathered_input_is_differentiable(use_y, fused):
    """all_gather_matmul_and_input against two weights (a region's q and k): y equals the
    gathered x times each weight, the gathered x equals the all-gather, and a loss that uses it
    (alone, or with y) gives x and the weights the unfused path's gradients, in float64."""
    state = mpu.initialize(tp=2)
    group, rank = state.tp.group, state.tp.rank
    x = seeded((8, 2, 6), torch.float64, 1).chunk(2)[rank]
    weights = [seeded((5, 6), torch.float64, 2 + rank), seeded((3, 6), torch.float64, 4 + rank)]
    results = []
    for ours in (True, False):
        xi = x.clone().requires_grad_()
        wi = [w.clone().requires_grad_() for w in weights]
        if ours:
            y, full = all_gather_matmul_and_input(xi, wi, group, 2, fused=fused)
        else:
            full = mappings.gather_from_sp_region(xi, group)
            y = torch.cat([F.linear(full, w) for w in wi], -1)
        loss = (full * seeded(full.shape, torch.float64, 7 + rank)).sum()
        if use_y:
            loss = loss + (y * seeded(y.shape, torch.float64, 9 + rank)).sum()
        loss.backward()
        results.append((y.detach(), full.detach(), xi.grad, *(w.grad for w in wi)))
    ours, reference = results
    assert torch.equal(ours[1], reference[1])
    assert_close(ours[0], reference[0], name="y", terms=6)
    assert_close(ours[2], reference[2], name="grad x", terms=5 + 3 + 2)
    for got, want in zip(ours[3:], reference[3:]):
        if use_y:
            assert_close(got, want, name="grad weight", terms=16)
        else:
            assert got is None and want is None  # y unused: no gradient reaches the weights


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("use_y", [False, True])
def test_gathered_input_is_differentiable(use_y, fused):
    run_on_ranks(_gathered_input_is_differentiable, 2, use_y, fused)


def _paths_are_counted():
    mpu.initialize(tp=2)
    column = ColumnParallelLinear(8, 8, sequence_parallel=True, overlap_comm=True)
    row = RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True, overlap_comm=True)
    plain = ColumnParallelLinear(8, 8, sequence_parallel=True)
    x = torch.randn(2, 1, 8)
    row(column(x))
    row(column(x))
    plain(x)
    return column.calls_by_path, row.calls_by_path, plain.calls_by_path


def test_layers_report_the_path_they_ran():
    column, row, plain = run_on_ranks(_paths_are_counted, 2)[0]
    assert column == {"fused all_gather_matmul": 2}
    assert row == {"fused matmul_reduce_scatter": 2}
    assert plain == {"all-gather then matmul": 1}


def _bad_overlap_input():
    group = mpu.initialize(tp=4).tp.group
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match=r"disagree on k"):
        native.all_gather_matmul(x, torch.randn(6, 7), group, 1)
    with pytest.raises(RuntimeError, match=r"this rank's 4 rows do not split into "
                                           r"chunks_per_rank=3 equal pieces"):
        native.all_gather_matmul(x, w, group, 3)
    with pytest.raises(RuntimeError, match=r"x has 6 rows, which do not split into tp=4 x "
                                           r"chunks_per_rank=1 equal pieces"):
        native.matmul_reduce_scatter(torch.randn(6, 8), w, group, 1)
    with pytest.raises(RuntimeError, match=r"weight is on meta but x is on cpu"):
        native.all_gather_matmul(x, w.to("meta"), group, 1)
    with pytest.raises(RuntimeError, match=r"x is torch.float32 but weight is torch.float64"):
        native.matmul_reduce_scatter(x, w.double(), group, 1)
    with pytest.raises(RuntimeError, match=r"expects x \[rows, k\]"):
        native.all_gather_matmul(x[None], w, group, 1)
    with pytest.raises(ValueError, match=r"overlap_comm=True\) .* needs sequence_parallel=True"):
        ColumnParallelLinear(8, 8, overlap_comm=True)
    with pytest.raises(ValueError, match=r"chunks_per_rank=0 must be an integer >= 1"):
        RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True, overlap_comm=True,
                          chunks_per_rank=0)


def test_bad_input_is_a_clear_error():
    run_on_ranks(_bad_overlap_input, 4)
