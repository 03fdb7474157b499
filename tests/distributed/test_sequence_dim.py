"""Sequence parallelism along another dim than the first (batch-first ``[b, s, h]``, as in Hugging
Face models): a small embedding → MLP block against the dense one it was converted from, with and
without the fused ring ops, and the errors for a sequence dim that does not fit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parallelkit import mpu
from parallelkit.distributed import comm, mappings
from parallelkit.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                         VocabParallelEmbedding, sync_sequence_parallel_grads)
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close

VOCAB, HIDDEN, FFN = 16, 8, 24  # every one divisible by tp = 2 and 4
BATCH, SEQ = 3, 8  # SEQ divisible by tp; BATCH not, so a split of the wrong dim cannot pass
# ids shape per sequence_dim (of the output [.., h]): batch-first for 1 and -2, else sequence-first.
IDS_SHAPE = {1: (BATCH, SEQ), -2: (BATCH, SEQ), 0: (SEQ, BATCH)}


class DenseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)

    def forward(self, ids):
        return self.down(F.gelu(self.up(self.embed(ids))))

    def activations(self, ids):
        """Embedding, MLP-up and block outputs: each layer's is checked, since a token order
        mixed up by the column layer and mixed back by the row one would leave only the MLP's
        (token-wise) output right."""
        embedded = self.embed(ids)
        up = self.up(embedded)
        return embedded, up, self.down(F.gelu(up))


class SequenceParallelBlock(nn.Module):
    """``DenseBlock``, every layer sequence-parallel along ``sequence_dim``: out [b, s/tp, h]."""

    def __init__(self, dense: DenseBlock, sequence_dim: int, overlap_comm: bool):
        super().__init__()
        self.embed = VocabParallelEmbedding.from_dense(dense.embed, sequence_parallel=True,
                                                       sequence_dim=sequence_dim)
        self.up = ColumnParallelLinear.from_dense(dense.up, sequence_parallel=True,
                                                  sequence_dim=sequence_dim,
                                                  overlap_comm=overlap_comm)
        self.down = RowParallelLinear.from_dense(dense.down, input_is_parallel=True,
                                                 sequence_parallel=True, sequence_dim=sequence_dim,
                                                 overlap_comm=overlap_comm)

    forward, activations = DenseBlock.forward, DenseBlock.activations


def generator(seed):
    return torch.Generator().manual_seed(seed)


def _block_parity(tp, sequence_dim, overlap_comm):
    state = mpu.initialize(tp=tp)
    group, rank = state.tp.group, state.tp.rank
    torch.manual_seed(0)
    dense = DenseBlock().double()
    model = SequenceParallelBlock(dense, sequence_dim, overlap_comm)
    # 24 draws from 16 ids repeat some, so the embedding gradient sums rows.
    ids = torch.randint(0, VOCAB, IDS_SHAPE[sequence_dim], generator=generator(1))
    dim = sequence_dim % 3  # of the output [.., h]
    # loss = sum(out * weights): every output element counts, each with its own weight.
    weights = torch.randn((*ids.shape, HIDDEN), dtype=torch.float64, generator=generator(2))

    dense_embedded, dense_up, dense_out = dense.activations(ids)
    dense_loss = (dense_out * weights).sum()
    dense_loss.backward()
    embedded, up, out = model.activations(ids)
    # Each rank's loss covers its part of the sequence; their backward passes together give
    # the gradient of the total (the reduce-scatter's backward all-gathers the output gradients).
    loss = (out * weights.chunk(tp, dim)[rank]).sum()
    loss.backward()
    sync_sequence_parallel_grads(model, group)  # down.bias saw only this rank's tokens

    assert_close(embedded, dense_embedded.chunk(tp, dim)[rank], name="embedding output")
    assert_close(up, dense_up.chunk(tp, -1)[rank], name="MLP-up output (all of the sequence)")
    assert_close(out, dense_out.chunk(tp, dim)[rank], name="output (this rank's sequence part)")
    assert_close(comm.all_reduce(loss.detach(), group), dense_loss, name="loss")
    dense_params = dict(dense.named_parameters())
    assert dense_params.keys() == dict(model.named_parameters()).keys()
    for name, param in model.named_parameters():
        ref_grad = dense_params[name].grad
        if param.tp_shard_dim is not None:
            ref_grad = ref_grad.chunk(tp, param.tp_shard_dim)[rank]
        assert_close(param.grad, ref_grad, name=f"{name} grad")
    assert model.up.calls_by_path == {"fused all_gather_matmul" if overlap_comm
                                      else "all-gather then matmul": 1}
    assert model.down.calls_by_path == {"fused matmul_reduce_scatter" if overlap_comm
                                        else "matmul then reduce-scatter": 1}


@pytest.mark.parametrize("overlap_comm", [False, True], ids=["unfused", "overlap"])
@pytest.mark.parametrize("sequence_dim", [1, -2, 0])
@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_block_equals_dense(tp, sequence_dim, overlap_comm):
    run_on_ranks(_block_parity, 4, tp, sequence_dim, overlap_comm)


def _bad_sequence_dim():
    mpu.initialize(tp=4)
    row = RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True, sequence_dim=1)
    fused_row = RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True,
                                  sequence_dim=1, overlap_comm=True)
    embedding = VocabParallelEmbedding(16, 4, sequence_parallel=True, sequence_dim=1)
    not_divisible = r"splits the sequence \(dim 1 of \[b, s, h\]\) across tp=4 ranks, but s=6 " \
                    r"is not divisible by 4; pad the sequence to a multiple of 4"
    for layer, x in [(row, torch.randn(4, 6, 2)), (fused_row, torch.randn(4, 6, 2)),
                     (embedding, torch.zeros(4, 6, dtype=torch.long))]:
        with pytest.raises(ValueError, match=not_divisible):
            layer(x)
    with pytest.raises(ValueError, match=r"dim 2 of \[b0, b1, s, h\]\) across tp=4 ranks, but "
                                         r"s=3"):
        RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True,
                          sequence_dim=-2)(torch.randn(4, 4, 3, 2))

    for sequence_dim in (2, 3, -1, -4):
        column = ColumnParallelLinear(8, 8, sequence_parallel=True, sequence_dim=sequence_dim)
        with pytest.raises(ValueError, match=rf"ColumnParallelLinear sequence_dim={sequence_dim} "
                                             r"does not name a sequence dim of its input of shape "
                                             r"\(2, 4, 8\): it must be one of 0\.\.1 "
                                             r"\(or -3\.\.-2\), not the last dim \(the features\)"):
            column(torch.randn(2, 4, 8))
    for layer, x in [
        (RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True, sequence_dim=2,
                           overlap_comm=True), torch.randn(4, 4, 2)),
        (VocabParallelEmbedding(16, 4, sequence_parallel=True, sequence_dim=2),
         torch.zeros(4, 4, dtype=torch.long)),  # dim 2 of the output [b, s, 4] is the features
        (VocabParallelEmbedding(16, 4, sequence_parallel=True, sequence_dim=-1),
         torch.zeros(4, 4, dtype=torch.long)),
        (ColumnParallelLinear(8, 8, sequence_parallel=True, sequence_dim=0), torch.randn(8)),
    ]:
        with pytest.raises(ValueError, match=r"does not name a sequence dim"):
            layer(x)

    # Unused without sequence parallelism: any int is accepted and changes nothing.
    plain = ColumnParallelLinear(8, 8, sequence_dim=5)
    assert plain(torch.randn(2, 8)).shape == (2, 2)


def test_bad_sequence_dim_is_a_clear_error():
    run_on_ranks(_bad_sequence_dim, 4)


@pytest.mark.parametrize("bad", ["1", 1.0, True, None])
def test_sequence_dim_must_be_an_int(bad):
    """Checked before anything else, so no process group is needed to see the error."""
    message = rf"sequence_dim={bad!r} must be an int: 0 for sequence-first \[s, b, h\]"
    for make in (lambda: ColumnParallelLinear(8, 8, sequence_parallel=True, sequence_dim=bad),
                 lambda: RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True,
                                           sequence_dim=bad),
                 lambda: VocabParallelEmbedding(16, 4, sequence_parallel=True, sequence_dim=bad),
                 lambda: ColumnParallelLinear.from_dense(nn.Linear(8, 8), sequence_dim=bad),
                 lambda: RowParallelLinear.from_dense(nn.Linear(8, 8), sequence_dim=bad),
                 lambda: VocabParallelEmbedding.from_dense(nn.Embedding(16, 4),
                                                           sequence_dim=bad)):
        with pytest.raises(ValueError, match=message):
            make()


def _sequence_dim_is_stored_and_shown():
    mpu.initialize(tp=2)
    layers = [ColumnParallelLinear.from_dense(nn.Linear(8, 8), sequence_parallel=True,
                                              sequence_dim=1),
              RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel=True,
                                sequence_dim=-2),
              VocabParallelEmbedding.from_dense(nn.Embedding(16, 4), sequence_parallel=True,
                                                sequence_dim=1)]
    return [(layer.sequence_dim, repr(layer)) for layer in layers]


def test_sequence_dim_is_stored_and_shown():
    (column, row, embedding) = run_on_ranks(_sequence_dim_is_stored_and_shown, 2)[0]
    assert column[0] == 1 and "sequence_parallel=True, sequence_dim=1," in column[1]
    assert row[0] == -2 and "sequence_dim=-2" in row[1]
    assert embedding[0] == 1 and "sequence_dim=1)" in embedding[1]


def test_sequence_dim_of():
    assert mappings.sequence_dim_of("L", (2, 4, 8), -2) == 1
    assert mappings.sequence_dim_of("L", (2, 4, 8), 0) == 0
    assert mappings.sequence_dim_of("L", (2, 3, 4, 8), -3) == 1
    with pytest.raises(ValueError, match=r"L sequence_dim=0 does not name a sequence dim of its "
                                         r"input of shape \(8,\): it must be a dim other than the "
                                         r"features, and it has none"):
        mappings.sequence_dim_of("L", (8,), 0)
