"""merge_attention_partials_ (CPU, and CUDA where present) against the float64 reference and
against softmax attention over all keys at once."""

import pytest
import torch

from parallelkit.ops import merge_attention_partials_
from parallelkit.reference import merge_attention_partials
from parallelkit.testing.tolerances import tolerance

NEG_INF = float("-inf")


def rounding(dtype, terms=2):
    """The error of a merge of ``terms`` partials of order 1 rounded to ``dtype``. Each test
    names the dtype whose rounding it exposes: the merge's accumulation (out's dtype) when the
    reference sees the same inputs, the blocks' dtype when they were rounded from float64."""
    return tolerance(dtype, terms)

DTYPES = [  # (out and lse dtype, block_out dtype)
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def make_partials(lse_shape, d, dtype, block_dtype, device, seed=0):
    """Random (out, lse, block_out, block_lse) plus each row's kind: 0 normal, 1 nothing seen yet
    (lse -inf, out NaN as torch.empty may hold), 2 fully masked block (block_lse -inf, block_out
    NaN as a softmax over no keys gives), 3 both."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(*lse_shape, d, generator=g, dtype=torch.float64)
    block_out = torch.randn(*lse_shape, d, generator=g, dtype=torch.float64)
    lse = 5 * torch.randn(lse_shape, generator=g, dtype=torch.float64)
    block_lse = 5 * torch.randn(lse_shape, generator=g, dtype=torch.float64)
    # Push one side of some rows far down, so exp of the difference underflows in float32 or in
    # both dtypes. (Shifting both sides would only measure float32's rounding of a large lse.)
    shift = torch.tensor([0.0, -90.0, -1e4], dtype=torch.float64)
    shift = shift[torch.randint(0, 3, lse_shape, generator=g)]
    on_lse = torch.rand(lse_shape, generator=g) < 0.5
    lse += torch.where(on_lse, shift, 0.0)
    block_lse += torch.where(on_lse, 0.0, shift)

    kind = torch.randint(0, 6, lse_shape, generator=g)
    kind[kind > 3] = 0  # half the rows normal
    lse[(kind == 1) | (kind == 3)] = NEG_INF
    block_lse[(kind == 2) | (kind == 3)] = NEG_INF
    out[kind == 1] = float("nan")
    block_out[(kind == 2) | (kind == 3)] = float("nan")

    def to(t, dt):
        return t.to(device=device, dtype=dt)

    partials = to(out, dtype), to(lse, dtype), to(block_out, block_dtype), to(block_lse, dtype)
    return *partials, kind.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,block_dtype", DTYPES)
@pytest.mark.parametrize("lse_shape,d", [((7,), 1), ((2, 3, 5), 16), ((1, 2, 3, 9), 33), ((2, 0), 8)])
def test_matches_reference(device, dtype, block_dtype, lse_shape, d):
    out, lse, block_out, block_lse, kind = make_partials(lse_shape, d, dtype, block_dtype, device)
    out0, lse0 = out.clone(), lse.clone()
    ref_out, ref_lse = merge_attention_partials(
        out.double(), lse.double(), block_out.double(), block_lse.double()
    )

    merge_attention_partials_(out, lse, block_out, block_lse)

    torch.testing.assert_close(out.double(), ref_out, **rounding(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, **rounding(dtype))
    # A fully masked block leaves its rows bit for bit; a NaN in them would have failed above.
    untouched = (kind == 2) | (kind == 3)
    assert torch.equal(out[untouched], out0[untouched])
    assert torch.equal(lse[untouched], lse0[untouched])


def attention(q, k, v, mask):
    """Softmax attention and its log-sum-exp. q: [b, h, s, d], k/v: [b, h, n, d], mask: [s, n]
    (True = may attend). A row with no allowed key gives out NaN and lse -inf."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, NEG_INF)
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,block_dtype", DTYPES)
def test_merging_blocks_equals_attention_over_all_keys(device, dtype, block_dtype):
    # Causal attention with keys cut into 3 uneven blocks, as ring attention receives them: for
    # early queries the later blocks are fully masked, which exercises the -inf rows.
    g = torch.Generator().manual_seed(1)
    b, h, s, d, sizes = 2, 3, 11, 8, [4, 3, 4]
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(3))
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    expected_out, expected_lse = attention(q, k, v, causal)

    out = torch.zeros(b, h, s, d, dtype=dtype, device=device)
    lse = torch.full((b, h, s), NEG_INF, dtype=dtype, device=device)
    blocks = zip(k.split(sizes, -2), v.split(sizes, -2), causal.split(sizes, -1))
    for k_block, v_block, mask_block in blocks:
        block_out, block_lse = attention(q, k_block, v_block, mask_block)
        merge_attention_partials_(
            out, lse, block_out.to(device, block_dtype), block_lse.to(device, dtype)
        )

    # Three blocks merged; each block's out was a float64 softmax-weighted sum over d.
    terms = len(sizes) + d
    torch.testing.assert_close(out.cpu().double(), expected_out, **rounding(block_dtype, terms))
    torch.testing.assert_close(lse.cpu().double(), expected_lse, **rounding(dtype, terms))


def _bad_inputs():
    def partials(**change):
        args = dict(
            out=torch.zeros(2, 3, 4), lse=torch.zeros(2, 3),
            block_out=torch.zeros(2, 3, 4), block_lse=torch.zeros(2, 3),
        )
        args.update(change)
        return args

    return [
        (partials(block_out=torch.zeros(2, 3, 5)), r"block_out must have the shape of out"),
        (partials(block_lse=torch.zeros(2, 4)), r"block_lse must have the shape of lse"),
        (partials(lse=torch.zeros(2, 4)), r"must be lse's shape \[\.\.\., s\] plus a last dim d"),
        (partials(out=torch.zeros(2, 3, 4, dtype=torch.int32)),
         r"out must be torch.float32 or torch.float64"),
        (partials(lse=torch.zeros(2, 3, dtype=torch.float64)), r"lse must be torch.float32"),
        (partials(block_out=torch.zeros(2, 3, 4, dtype=torch.float64)),
         r"block_out must be torch.float32 like out"),
        (partials(out=torch.zeros(2, 4, 3).transpose(1, 2)),
         r"out must be contiguous.*pass out.contiguous\(\)"),
        (partials(block_lse=torch.zeros(3, 2).t()), r"block_lse must be contiguous"),
    ]


@pytest.mark.parametrize("args,message", _bad_inputs())
def test_bad_input_is_rejected_with_a_clear_message(args, message):
    with pytest.raises(RuntimeError, match=message):
        merge_attention_partials_(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # All four default checks run. test_schema: the kernel writes exactly the (a!)/(b!) args.
    # test_faketensor, test_aot_dispatch_dynamic: torch generates the fake kernel of an op that
    # only mutates and returns nothing. test_autograd_registration passes vacuously: the op has no
    # autograd (the ring attention Function will own the backward), so no input requires grad.
    partials = make_partials((2, 3, 5), 8, torch.float32, torch.bfloat16, device)[:4]
    torch.library.opcheck(torch.ops.parallelkit.merge_attention_partials_.default, partials)
