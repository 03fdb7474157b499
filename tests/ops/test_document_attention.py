"""Attention within packed documents: the key ranges against the mask they stand for, and the
block kernels (Triton's interpreter) and the torch path against float64 SDPA with a
block-diagonal mask, forward and dq/dk/dv."""

import pytest
import torch
import torch.nn.functional as F

import parallelkit.kernels.flash_attention as flash
import parallelkit.ops.attention_block as attention_block
from parallelkit.ops.attention_mask import document_ranges, offset_ranges
from parallelkit.ops.document_attention import document_attention, packed_attention
from parallelkit.reference.attention import attention_block_reference
from parallelkit.testing.tolerances import tolerance

# Mixed lengths: single tokens, a document spanning several 16-row tiles, tiles holding the end
# of one document and the start of the next.
LENGTHS = [1, 7, 20, 1, 35]


def boundaries(lengths):
    return torch.tensor([0] + lengths).cumsum(0)


def documents_of(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def block_diagonal_mask(lengths, causal):
    """SDPA's boolean mask (True: attend) of a packed sequence."""
    doc = documents_of(lengths)
    mask = doc[:, None] == doc[None, :]
    return mask & torch.ones_like(mask).tril() if causal else mask


def make_qkv(heads, kv_heads, seq, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, seq, d, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(2, heads, seq, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def sdpa_reference(q, k, v, dout, mask):
    """Out and (dq, dk, dv) of float64 SDPA under the boolean mask (GQA by repeating K/V)."""
    ref = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(ref[0], ref[1].repeat_interleave(rep, 1),
                                         ref[2].repeat_interleave(rep, 1), attn_mask=mask)
    out.backward(dout.double())
    return out.detach(), [t.grad for t in ref]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ranges_are_the_mask(causal):
    # Per-row documents and positions with gaps (a rank's share of a packed sequence), queries
    # and keys from different shares, rows of the batch with different boundaries.
    g = torch.Generator().manual_seed(0)
    q_pos = torch.stack([torch.randperm(200, generator=g)[:40].sort().values for _ in range(3)])
    k_pos = torch.stack([torch.randperm(200, generator=g)[:50].sort().values for _ in range(3)])
    cuts = torch.stack([torch.randperm(199, generator=g)[:6].sort().values + 1 for _ in range(3)])

    def doc(pos):
        return torch.searchsorted(cuts, pos, right=True)

    ranges = document_ranges(q_pos, k_pos, causal, doc(q_pos), doc(k_pos))
    same = doc(q_pos)[:, :, None] == doc(k_pos)[:, None, :]
    expected = same & (k_pos[:, None, :] <= q_pos[:, :, None]) if causal else same
    assert torch.equal(ranges.visible(), expected)
    # Seen from the keys: the queries that see key j are [query_start[j], query_end[j]).
    queries = torch.arange(40)
    seen_by = ((queries[None, None, :] >= ranges.query_start[..., None])
               & (queries[None, None, :] < ranges.query_end[..., None]))
    assert torch.equal(seen_by, expected.transpose(1, 2))
    assert ranges.any_visible()


def test_offset_ranges_are_the_causal_block():
    ranges = offset_ranges(5, 7, True, q_offset=10, k_offset=8)
    q_pos, k_pos = 10 + torch.arange(5), 8 + torch.arange(7)
    assert torch.equal(ranges.visible()[0], k_pos[None, :] <= q_pos[:, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 64), (2, 2, 80), (4, 1, 128)],
                         ids=["GQA-d64", "MHA-d80", "MQA-d128"])
def test_kernels_match_block_diagonal_sdpa(dtype, causal, heads, kv_heads, d):
    # 16-row tiles: documents start and end inside tiles, and tiles outside every row's range
    # are skipped.
    seq = sum(LENGTHS)
    q, k, v, dout = make_qkv(heads, kv_heads, seq, d, dtype)
    expected_out, expected_grads = sdpa_reference(q, k, v, dout, block_diagonal_mask(LENGTHS,
                                                                                     causal))
    pos, doc = torch.arange(seq), documents_of(LENGTHS)
    r = document_ranges(pos, pos, causal, doc, doc)

    out, lse = flash.flash_attention_block_forward(q, k, v, r.key_start, r.key_end, block_m=16,
                                                   block_n=16)
    grads = flash.flash_attention_block_backward(
        q, k, v, out, dout, lse, r.key_start, r.key_end, r.query_start, r.query_end,
        block_m=16, block_n=16)

    terms = max(LENGTHS) + d + max(LENGTHS) * heads // kv_heads
    torch.testing.assert_close(out.double(), expected_out, **tolerance(dtype, terms))
    ref_lse = attention_block_reference(q, k, v, causal, q_positions=pos, k_positions=pos,
                                        q_documents=doc, k_documents=doc)[1]
    torch.testing.assert_close(lse.double(), ref_lse, **tolerance(torch.float32, terms))
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        torch.testing.assert_close(got.double(), want, **tolerance(dtype, terms),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float64), ("torch-windows", torch.float64),
                                        ("triton", torch.float32)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_attention_autograd(impl, dtype, causal, monkeypatch):
    monkeypatch.setenv("PARALLELKIT_TRITON", "1" if impl == "triton" else "0")
    if impl == "torch-windows":  # windows of 16 query rows, each against the keys they see
        monkeypatch.setattr(attention_block, "_ROWS", 16)
    seq = sum(LENGTHS)
    q, k, v, dout = make_qkv(4, 2, seq, 16, dtype, seed=1)
    expected_out, expected_grads = sdpa_reference(q, k, v, dout, block_diagonal_mask(LENGTHS,
                                                                                     causal))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = packed_attention(*inputs, boundaries(LENGTHS), causal=causal)
    out.backward(dout)
    assert out.dtype == dtype
    terms = max(LENGTHS) + 16 + 2 * max(LENGTHS)
    torch.testing.assert_close(out.double(), expected_out, **tolerance(dtype, terms))
    for name, t, want in zip(("dq", "dk", "dv"), inputs, expected_grads):
        torch.testing.assert_close(t.grad.double(), want, **tolerance(dtype, terms),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_query_whose_document_has_no_keys_gets_zero(impl, monkeypatch):
    # Keys hold documents 0 and 2 only: the queries of document 1 see nothing (out 0, lse -inf)
    # and give no gradient; never NaN.
    monkeypatch.setenv("PARALLELKIT_TRITON", "1" if impl == "triton" else "0")
    q_doc, k_doc = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 2, 2])
    q_pos, k_pos = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 1, 4, 5])
    ranges = document_ranges(q_pos, k_pos, True, q_doc, k_doc)
    q, k, v, _ = make_qkv(2, 2, 6, 16, torch.float32)
    k, v = k[:, :, :4].clone().requires_grad_(), v[:, :, :4].clone().requires_grad_()
    q.requires_grad_()
    out = document_attention(q, k, v, ranges)
    assert not out[:, :, 2:4].any()
    out.sum().backward()
    assert not q.grad[:, :, 2:4].any()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("args,message", [
    (dict(q_positions=torch.tensor([0, 2, 1])), r"query positions must increase strictly"),
    (dict(k_documents=torch.tensor([1, 0, 1])), r"key document ids must not decrease"),
    (dict(q_documents=torch.tensor([0, 0, 1]), k_documents=torch.tensor([0, 1, 1])),
     r"query and key document ids disagree"),
    (dict(k_documents=None), r"for both the queries and the keys, or for neither"),
    (dict(q_positions=torch.tensor([0.0, 1.0, 2.0])), r"q_positions must be a 1-D \[S\] or 2-D"),
])
def test_bad_documents_are_refused(args, message):
    base = dict(q_positions=torch.arange(3), k_positions=torch.arange(3),
                q_documents=torch.tensor([0, 0, 1]), k_documents=torch.tensor([0, 0, 1]))
    base.update(args)
    with pytest.raises(ValueError, match=message):
        document_ranges(causal=True, **base)


def test_packed_attention_refuses_bad_boundaries():
    q = torch.zeros(1, 1, 8, 16)
    for bounds in ([0, 5, 3, 8], [1, 8], [0, 4, 6]):
        with pytest.raises(ValueError, match=r"cu_seqlens must increase strictly from 0 to the "
                                             r"sequence length 8"):
            packed_attention(q, q, q, torch.tensor(bounds))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_compiled_document_kernels_match_block_diagonal_sdpa(dtype, d):
    # The GPU's own tiles over documents of 1 to 300 tokens (several tiles each way).
    lengths = [1, 300, 45, 1, 190]
    q, k, v, dout = (t.cuda() for t in make_qkv(8, 2, sum(lengths), d, dtype, seed=2))
    expected_out, expected_grads = sdpa_reference(q, k, v, dout,
                                                  block_diagonal_mask(lengths, True).cuda())
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = packed_attention(*inputs, boundaries(lengths).cuda(), causal=True)
    out.backward(dout)
    terms = max(lengths) + d + 4 * max(lengths)
    torch.testing.assert_close(out.double(), expected_out, **tolerance(dtype, terms))
    for name, t, want in zip(("dq", "dk", "dv"), inputs, expected_grads):
        torch.testing.assert_close(t.grad.double(), want, **tolerance(dtype, terms),
                                   msg=lambda m, name=name: f"{name}: {m}")
