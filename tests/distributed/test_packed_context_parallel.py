"""Packed documents under context parallelism: ring (zigzag, contiguous) and Ulysses attention on
2 and 4 CP ranks, each document split on its own, against float64 SDPA with a block-diagonal
mask on the whole packed sequence; the split helpers; a packed transformers model at tp 2 × cp 2
and tp 2 against the unconverted model; and the errors for bad boundaries."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelkit import mpu
from parallelkit.context_parallel import ContextParallelAttention
from parallelkit.context_parallel.packing import (document_shift_labels, pack_documents,
                                                  split_packed_batch)
from parallelkit.distributed import comm
from parallelkit.distributed.packed_layout import (PackedLayout, gather_packed, pad_documents,
                                                   split_packed)
from parallelkit.parallelize import parallelize
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close, gradient_scale, transformer_terms

# Real document lengths: single tokens, one longer than a rank's share of the whole sequence.
LENGTHS = [1, 13, 3, 70, 1, 9]


def packed_mask(cu_seqlens, causal):
    """SDPA's boolean mask (True: attend) of the padded packed sequence."""
    bounds = torch.as_tensor(cu_seqlens)
    doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff())
    mask = doc[:, None] == doc[None, :]
    return mask & torch.ones_like(mask).tril() if causal else mask


def _packed_vs_sdpa(cp, layout, mode, causal, heads, kv_heads, d):
    group = mpu.initialize(cp=cp).cp.group
    rank = dist.get_rank(group)
    multiple = 2 * cp if layout == "zigzag" else cp
    cu_seqlens, _ = pad_documents([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), multiple)
    seq = cu_seqlens[-1]
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(2, heads, seq, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, kv_heads, seq, d, generator=g, dtype=torch.float64) for _ in range(2))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    rep = heads // kv_heads
    expected = F.scaled_dot_product_attention(ref[0], ref[1].repeat_interleave(rep, 1),
                                              ref[2].repeat_interleave(rep, 1),
                                              attn_mask=packed_mask(cu_seqlens, causal))
    expected.backward(dout)

    packed = PackedLayout.build(cu_seqlens, cp, layout)
    local = [split_packed(t, packed, rank, dim=2).requires_grad_() for t in (q, k, v)]
    attention = ContextParallelAttention(group, layout, mode)
    out = attention(*local, is_causal=causal, cu_seqlens=torch.tensor(cu_seqlens),
                    position_ids=packed.positions(rank))
    out.backward(split_packed(dout, packed, rank, dim=2))
    terms = d + 2 * max(LENGTHS) * rep
    for name, got, want in [("out", out, expected), ("dq", local[0].grad, ref[0].grad),
                            ("dk", local[1].grad, ref[1].grad), ("dv", local[2].grad, ref[2].grad)]:
        assert_close(gather_packed(got.detach(), packed, group, dim=2), want, name=name,
                     terms=terms)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cp", [2, 4])
def test_packed_ring_equals_block_diagonal_sdpa(cp, causal, layout):
    run_on_ranks(_packed_vs_sdpa, 4, cp, layout, "ring", causal, 4, 2, 16)


@pytest.mark.parametrize("heads,kv_heads,d", [(4, 1, 64), (2, 2, 80), (4, 4, 128)])
def test_packed_ring_head_dims(heads, kv_heads, d):
    run_on_ranks(_packed_vs_sdpa, 4, 2, "zigzag", "ring", True, heads, kv_heads, d)


@pytest.mark.parametrize("cp", [2, 4])
def test_packed_ulysses_equals_block_diagonal_sdpa(cp):
    run_on_ranks(_packed_vs_sdpa, 4, cp, "zigzag", "ulysses", True, 4, 2, 16)


def test_split_helpers():
    packed = PackedLayout.build([0, 8, 24], 2, "zigzag")
    # Each document in 4 chunks; rank 0 takes chunks 0 and 3 of each, rank 1 chunks 1 and 2.
    assert packed.token_index(0).tolist() == [0, 1, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23]
    assert packed.positions(1).tolist() == [2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11]
    assert packed.local_cu_seqlens() == [0, 4, 12]
    ids, cu_seqlens, lengths = pack_documents([torch.arange(1, 4), torch.tensor([9])], 4)
    assert ids.tolist() == [[1, 2, 3, 0, 9, 0, 0, 0]] and cu_seqlens.tolist() == [0, 4, 8]
    padded = PackedLayout.build(cu_seqlens, 2, "zigzag", lengths)
    assert padded.documents(0).tolist() == [0, 1, 2, 3]  # real / padding of each document
    x = torch.arange(24).view(1, 24)
    assert sorted(torch.cat([split_packed(x, packed, r) for r in range(2)], 1)[0].tolist()) == \
        list(range(24))


@pytest.mark.parametrize("cu_seqlens,lengths,message", [
    ([1, 8], None, r"cu_seqlens must start at 0"),
    ([0, 8, 8, 16], None, r"must increase strictly .* document 1 spans \[8, 8\)"),
    ([0, 8, 14], None, r"document 1 has 6 tokens, not a multiple of 4: .* pad each document"),
    ([0, 8, 16], [9, 2], r"lengths must give 0 <= real tokens <= the padded length"),
])
def test_bad_boundaries_are_refused(cu_seqlens, lengths, message):
    with pytest.raises(ValueError, match=message):
        PackedLayout.build(cu_seqlens, 2, "zigzag", lengths)


def _bad_packed_input():
    group = mpu.initialize(cp=2).cp.group
    rank = dist.get_rank(group)
    attention = ContextParallelAttention(group)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"cu_seqlens end at 24 tokens but the cp=2 ranks hold "
                                         r"8 each"):
        attention(q, q, q, is_causal=True, cu_seqlens=torch.tensor([0, 8, 24]))
    with pytest.raises(ValueError, match=r"document 1 has 6 tokens, not a multiple of 4"):
        attention(q, q, q, is_causal=True, cu_seqlens=torch.tensor([0, 4, 10, 16]))
    # Different boundaries on the two ranks: both raise, naming the disagreement.
    mine = [0, 8, 16] if rank == 0 else [0, 4, 16]
    with pytest.raises(ValueError, match=r"cu seqlens"):
        attention(q, q, q, is_causal=True, cu_seqlens=torch.tensor(mine))
    # Packed position ids without the boundaries: the split does not match them.
    packed = PackedLayout.build([0, 8, 16], 2, "zigzag")
    with pytest.raises(ValueError, match=r"position_ids do not match .* global positions"):
        attention(q, q, q, is_causal=True, position_ids=packed.positions(rank))


def test_bad_packed_input_is_a_clear_error():
    run_on_ranks(_bad_packed_input, 2)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _packed_model(tp, cp):
    """A packed row of documents: the converted model's loss and every gradient against the
    unconverted model fed the same packed row (transformers masks it block-diagonally from the
    restarting position ids)."""
    state = mpu.initialize(tp=tp, cp=cp)
    torch.manual_seed(0)
    dense = tiny_llama().double()
    model = parallelize(copy.deepcopy(dense))
    g = torch.Generator().manual_seed(1)
    documents = [torch.randint(1, 128, (n,), generator=g) for n in (5, 1, 17, 9)]
    ids, cu_seqlens, lengths = pack_documents(documents, multiple=2 * cp)
    full = _whole_batch(ids, cu_seqlens, lengths)
    # Without a cache, so that transformers masks the packed row block-diagonally.
    dense_out = dense(**full, labels=full["shift_labels"], use_cache=False)
    dense_out.loss.backward()
    # The reference is independent of any packing: the documents one by one.
    with torch.no_grad():
        pairs = [(dense(input_ids=d[None], labels=d[None]).loss * (len(d) - 1), len(d) - 1)
                 for d in documents if len(d) > 1]
    assert_close(dense_out.loss.detach(), sum(p for p, _ in pairs) / sum(n for _, n in pairs),
                 dtype=torch.float32, name="packed dense loss", terms=160)
    batch = split_packed_batch(ids, cu_seqlens, lengths=lengths)
    out = model(**batch)
    # The loss is a mean over this rank's tokens: weight it by their count to sum over CP.
    count, total = (batch["shift_labels"] != -100).sum(), (full["shift_labels"] != -100).sum()
    loss = comm.all_reduce(out.loss.detach() * count, state.cp.group) / total
    assert_close(loss, dense_out.loss.detach(), dtype=torch.float32, name="loss", terms=160)
    (out.loss * count / total).backward()
    for p in model.parameters():
        p.grad = comm.all_reduce(p.grad, state.cp.group)
    dense_params, scale = dict(dense.named_parameters()), gradient_scale(dense)
    for name, param in model.named_parameters():
        dim = getattr(param, "tp_shard_dim", None)
        ref = dense_params[name].grad
        ref = ref if dim is None else ref.chunk(tp, dim)[state.tp.rank]
        assert_close(param.grad, ref, dtype=torch.float32, name=name, scale=scale,
                     terms=transformer_terms(ids.shape[1], 17, 64, 128, 128, 2))


def _whole_batch(ids, cu_seqlens, lengths):
    """The packed row as the unconverted model takes it (one rank holds everything)."""
    packed = PackedLayout.build(cu_seqlens, 1, "contiguous", lengths)
    return {"input_ids": ids, "position_ids": packed.positions(0)[None],
            "shift_labels": document_shift_labels(ids, cu_seqlens, lengths)}


@pytest.mark.parametrize("tp,cp", [(2, 2), (2, 1)])
def test_packed_hf_model_matches_unconverted(tp, cp):
    run_on_ranks(_packed_model, 4 if tp * cp == 4 else tp * cp, tp, cp, timeout=180)
