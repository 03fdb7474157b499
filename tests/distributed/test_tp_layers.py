"""TP layers on their own: layout-independent initialisation, the RNG tracker, and bad input."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.tensor_parallel import (ColumnParallelLinear, RNGStatesTracker,
                                         RowParallelLinear, VocabParallelEmbedding,
                                         get_rng_tracker, model_parallel_seed)
from parallelkit.testing import run_on_ranks


def _fresh_init_is_the_dense_init(tp):
    group = mpu.initialize(tp=tp).tp.group
    torch.manual_seed(5)
    column, row = ColumnParallelLinear(8, 12), RowParallelLinear(12, 8)
    embedding = VocabParallelEmbedding(16, 4)
    torch.manual_seed(5)
    dense_column, dense_row, dense_embedding = nn.Linear(8, 12), nn.Linear(12, 8), nn.Embedding(16, 4)
    pairs = [(column.weight, dense_column.weight, 0), (column.bias, dense_column.bias, 0),
             (row.weight, dense_row.weight, 1), (row.bias, dense_row.bias, None),
             (embedding.weight, dense_embedding.weight, 0)]
    for shard, dense, dim in pairs:
        full = shard.detach() if dim is None else comm.all_gather(shard.detach(), dim, group)
        assert torch.equal(full, dense.detach())


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_same_seed_same_full_weights_whatever_tp(tp):
    run_on_ranks(_fresh_init_is_the_dense_init, 4, tp)


def _draw_streams():
    mpu.initialize(tp=2)  # ranks 0,1 and 2,3 are TP pairs; 0,2 and 1,3 are DP pairs
    tracker = model_parallel_seed(123)
    outside = torch.rand(5)
    with tracker.fork():
        inside = torch.rand(5)
        dropped = torch.nn.functional.dropout(torch.ones(64), 0.5)
    after = torch.rand(5)
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork():
        again = torch.rand(3)
    assert torch.equal(first, again)  # restoring a checkpointed state replays the stream
    return mpu.get_tp_rank(), outside, inside, dropped, after


def test_rng_tracker_streams_per_tp_rank():
    results = run_on_ranks(_draw_streams, 4)
    torch.manual_seed(123)
    ref_outside, ref_after = torch.rand(5), torch.rand(5)
    for tp_rank, outside, inside, dropped, after in results:
        assert torch.equal(outside, ref_outside) and torch.equal(after, ref_after)
        torch.manual_seed(123 + 2718 + tp_rank)
        assert torch.equal(inside, torch.rand(5))
    assert torch.equal(results[0][3], results[2][3])  # same TP rank, other DP replica: same mask
    assert not torch.equal(results[0][3], results[1][3])  # other TP rank: another mask


def _bad_layer_input():
    mpu.initialize(tp=4)
    for make, message in [
        (lambda: ColumnParallelLinear(8, 6), r"ColumnParallelLinear out_features=6 is not "
                                             r"divisible by the tensor-parallel size tp=4"),
        (lambda: RowParallelLinear(6, 8), r"RowParallelLinear in_features=6 is not divisible"),
        (lambda: VocabParallelEmbedding(10, 4), r"num_embeddings \(vocab\)=10 is not divisible"),
        (lambda: RowParallelLinear(8, 8, sequence_parallel=True),
         r"needs input_is_parallel=True"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    row = RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"s=6 is not divisible by 4; pad the sequence"):
        row(torch.randn(6, 2, 2))
    embedding = VocabParallelEmbedding(16, 4, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"s=3 is not divisible by 4"):
        embedding(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(IndexError, match=r"token ids must be in \[0, 16\), got min 0 and max 16"):
        embedding(torch.tensor([[0], [16], [1], [2]]))
    with pytest.raises(TypeError, match="int64 or int32 ids"):
        embedding(torch.zeros(4, 2))
    column = ColumnParallelLinear(8, 8)
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 8\] .* got shape \(2, 5\)"):
        column(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 2\] \(this rank's 1/4 slice\)"):
        RowParallelLinear(8, 8, input_is_parallel=True)(torch.randn(2, 8))
    with pytest.raises(TypeError, match="expects an nn.Linear, got Embedding"):
        ColumnParallelLinear.from_dense(nn.Embedding(4, 4))


def test_bad_input_is_a_clear_error():
    run_on_ranks(_bad_layer_input, 4)


def test_layers_need_the_mpu_or_a_group():
    assert not dist.is_initialized()
    for make in (lambda: ColumnParallelLinear(4, 4), lambda: RowParallelLinear(4, 4),
                 lambda: VocabParallelEmbedding(4, 4)):
        with pytest.raises(ValueError, match=r"parallelkit.mpu is not initialized"):
            make()


def test_rng_tracker_errors():
    tracker = RNGStatesTracker("cpu")
    with pytest.raises(ValueError, match=r"no RNG stream named 'model-parallel-rng'"):
        with tracker.fork():
            pass
    tracker.add("a", 1)
    with pytest.raises(ValueError, match=r"RNG stream 'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match=r"device_type='tpu' must be 'cpu' or 'cuda'"):
        RNGStatesTracker("tpu")


def test_rng_tracker_before_seeding(monkeypatch):
    import parallelkit.tensor_parallel.random as tp_random

    monkeypatch.setattr(tp_random, "_tracker", None)
    with pytest.raises(ValueError, match=r"call parallelkit.tensor_parallel.model_parallel_seed"):
        get_rng_tracker()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_tracker_on_cuda():
    tracker = RNGStatesTracker("cuda")
    torch.cuda.manual_seed(1)
    tracker.add("tp", 7)
    outer = torch.cuda.get_rng_state()
    with tracker.fork("tp"):
        inside = torch.rand(4, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), outer)
    torch.cuda.manual_seed(7)
    assert torch.equal(inside, torch.rand(4, device="cuda"))


def _mlp_traffic(sequence_parallel):
    mpu.initialize(tp=4)
    s, b, h = 8, 2, 16
    up = ColumnParallelLinear(h, 4 * h, sequence_parallel=sequence_parallel)
    down = RowParallelLinear(4 * h, h, input_is_parallel=True, sequence_parallel=sequence_parallel)
    x = torch.randn(s // 4 if sequence_parallel else s, b, h, requires_grad=True)
    with comm.count_traffic() as traffic:
        down(torch.nn.functional.gelu(up(x))).sum().backward()
    return dict(traffic.calls), dict(traffic.payload), traffic.wire


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_mlp_communicates_what_the_algorithm_needs(sequence_parallel):
    """Column → Row: one all-reduce of [s, b, h] each way, or under sequence parallelism an
    all-gather plus a reduce-scatter each way and the column layer's input gathered once more in
    backward for its weight gradient (it keeps only this rank's tokens, as Megatron's does);
    nothing more."""
    nbytes = 8 * 2 * 16 * 4
    calls, payload, wire = run_on_ranks(_mlp_traffic, 4, sequence_parallel)[0]
    if sequence_parallel:
        assert calls == {"all_gather": 3, "reduce_scatter": 2}
        assert payload == {"all_gather": 3 * nbytes, "reduce_scatter": 2 * nbytes}
        assert wire == 5 * (3 / 4) * nbytes
    else:
        assert calls == {"all_reduce": 2} and payload == {"all_reduce": 2 * nbytes}
        assert wire == 4 * (3 / 4) * nbytes
