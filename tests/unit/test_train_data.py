"""The trainer's data: every sample once per epoch across DP ranks, CP ranks holding the parts of
the same samples, the token file read where it should be, and the LR schedule's shape."""

import math

import numpy as np
import pytest
import torch

from parallelkit.distributed.context_layout import chunk_ids
from parallelkit.train.data import BatchLoader, MemmapTokens, SyntheticTokens
from parallelkit.train.model import lr_factor


def _seen(source, global_batch, micro, dp, steps):
    """Per step, per DP rank, the sample indices it reads (micro-batches flattened)."""
    loaders = [BatchLoader(source, global_batch, micro, r, dp, seed=3) for r in range(dp)]
    return [[sum(loader.sample_indices(step), []) for loader in loaders] for step in steps]


@pytest.mark.parametrize("samples, global_batch, micro, dp", [(24, 8, 2, 2), (20, 8, 1, 4),
                                                               (21, 6, 1, 3)])
def test_every_sample_once_per_epoch_across_dp_ranks(samples, global_batch, micro, dp):
    source = SyntheticTokens(vocab=50, seq=4, num_samples=samples)
    steps = math.ceil(2 * samples / global_batch)
    stream = []  # the global order: step by step, DP rank r's k-th sample at r + k * dp
    for per_rank in _seen(source, global_batch, micro, dp, range(steps)):
        if samples % global_batch == 0:  # (else a batch spanning two epochs may repeat one)
            assert len({i for rank in per_rank for i in rank}) == global_batch  # disjoint
        assert all(len(rank) == global_batch // dp for rank in per_rank)
        stream += [per_rank[j % dp][j // dp] for j in range(global_batch)]
    first, second = stream[:samples], stream[samples:2 * samples]
    assert sorted(first) == list(range(samples)) and sorted(second) == list(range(samples))
    assert first != second  # each epoch has its own order
    # The order is a function of the step: a loader made later (a resumed run) reads the same.
    again = _seen(source, global_batch, micro, dp, [steps - 1])[0]
    assert again == _seen(source, global_batch, micro, dp, range(steps))[-1]


def test_cp_ranks_hold_the_parts_of_the_same_samples():
    seq, cp = 16, 2
    source = SyntheticTokens(vocab=50, seq=seq, num_samples=40)
    full = BatchLoader(source, 8, 2, dp_rank=1, dp=2, seed=1)
    parts = [BatchLoader(source, 8, 2, dp_rank=1, dp=2, cp_rank=c, cp=cp, seed=1)
             for c in range(cp)]
    micro = zip(full.sample_indices(5), full.micro_batches(5), *(p.micro_batches(5) for p in parts))
    for indices, whole, *pieces in micro:
        tokens = source.samples(indices)
        for name in ("ids", "labels", "positions"):
            chunks = [None] * (2 * cp)
            for rank, piece in enumerate(pieces):
                local = getattr(piece, name)
                for chunk, part in zip(chunk_ids("zigzag", rank, cp), local.chunk(2, dim=-1)):
                    chunks[chunk] = part
            assert torch.equal(torch.cat(chunks, dim=-1), getattr(whole, name)), name
        assert torch.equal(whole.ids, tokens[:, :-1]) and torch.equal(whole.labels, tokens[:, 1:])
        assert torch.equal(whole.positions, torch.arange(seq))


def test_synthetic_samples_depend_on_seed_and_index_only():
    source = SyntheticTokens(vocab=50, seq=32, num_samples=100, seed=7)
    together = source.samples([3, 9, 4])
    assert torch.equal(together[1], source.samples([9])[0])
    assert together.shape == (3, 33) and int(together.max()) < 50
    assert not torch.equal(together, SyntheticTokens(50, 32, 100, seed=8).samples([3, 9, 4]))
    # Mostly the successor walk: a bigram a model can learn.
    follows = source.successor[together[:, :-1]] == together[:, 1:]
    assert follows.float().mean() > 0.8


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_the_token_file_is_read_window_by_window(tmp_path, dtype):
    tokens = np.random.default_rng(0).integers(0, 1000, 101).astype(dtype)
    tokens.tofile(tmp_path / "train.bin")
    source = MemmapTokens(str(tmp_path / "train.bin"), seq=8, vocab=1000, dtype=dtype)
    assert source.num_samples == 12  # (101 - 1) // 8 windows of 9 tokens
    got = source.samples([0, 5, 11])
    for row, i in enumerate([0, 5, 11]):
        assert got[row].tolist() == tokens[i * 8:i * 8 + 9].tolist()
    assert got.dtype == torch.int64
    loader = BatchLoader(source, 4, 2, seed=0)
    batch = loader.micro_batches(0)[1]
    expected = torch.from_numpy(tokens.astype(np.int64))
    for row, i in enumerate(loader.sample_indices(0)[1]):
        assert torch.equal(batch.ids[row], expected[i * 8:i * 8 + 8])
        assert torch.equal(batch.labels[row], expected[i * 8 + 1:i * 8 + 9])


def test_bad_token_files_are_named(tmp_path):
    path = tmp_path / "bad.bin"
    np.arange(8, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=r"holds 8 tokens, fewer than one sample of seq \+ 1 = 9"):
        MemmapTokens(str(path), seq=8, vocab=100)
    path.write_bytes(b"\x00" * 41)
    with pytest.raises(ValueError, match=r"41 bytes, not a whole number of uint16 tokens"):
        MemmapTokens(str(path), seq=8, vocab=100)
    np.full(20, 500, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=r"token id 500 .* vocabulary has 100 ids"):
        MemmapTokens(str(path), seq=8, vocab=100).samples([0])
    with pytest.raises(ValueError, match=r"cannot read the token file"):
        MemmapTokens(str(tmp_path / "missing.bin"), seq=8, vocab=100)


def test_lr_warms_up_then_follows_a_cosine_to_the_floor():
    factors = [lr_factor(done, warmup=4, steps=20, min_ratio=0.1) for done in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and math.isclose(factors[20], 0.1)
    assert math.isclose(factors[12], 0.55)  # half way down the cosine
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
