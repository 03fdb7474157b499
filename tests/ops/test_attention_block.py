"""Attention over one block of keys (the flash-attention kernels in Triton's interpreter on CPU,
CUDA where present, and the op's torch path) against the float64 reference: the block forward,
blocks merged into attention over all keys, the blocks' backward against autograd of the full
attention, and input errors."""

import pytest
import torch

import parallelkit.kernels.flash_attention as flash
from parallelkit.kernels._launch import ATTENTION_TILES
from parallelkit.ops import merge_attention_partials_
from parallelkit.ops.attention_block import attention_block_backward, attention_block_forward
from parallelkit.ops.attention_mask import offset_ranges
from parallelkit.reference.attention import attention_block_reference
from parallelkit.testing.tolerances import tolerance

NEG_INF = float("-inf")


def _impls(*pairs):
    return [pytest.param(impl, dtype, id=f"{impl}-{str(dtype)[6:]}") for impl, dtype in pairs]


# (implementation, input dtype): the kernels take the training dtypes, the torch path float64 too.
IMPLS = _impls(("triton", torch.float32), ("triton", torch.bfloat16), ("triton", torch.float16),
               ("torch", torch.float64), ("torch", torch.float32), ("torch", torch.bfloat16))
GRAD_IMPLS = _impls(("triton", torch.float32), ("triton", torch.bfloat16),
                    ("torch", torch.float64), ("torch", torch.float32))


def out_tolerance(dtype, terms):
    """out and the gradients (order 1): one rounding to the input dtype (a GPU rounds P and dS to
    it for the tensor-core dots) and float32 sums of ``terms`` (keys, head dim, queries)."""
    return tolerance(dtype, terms)


def lse_tolerance(dtype, terms):
    """lse: the scores are exact products of the (rounded) inputs summed in float32."""
    return tolerance(torch.float64 if dtype == torch.float64 else torch.float32, terms)


def make_qkv(b, h, h_kv, s_q, s_k, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s_q, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, s_k, d, generator=g, dtype=torch.float64) for _ in range(2))
    return tuple(t.to(device, dtype) for t in (q, k, v))


def kernel_ranges(q, k, ranges=None, causal=False, q_offset=0, k_offset=0):
    """The launchers' mask: the given KeyRanges, or the causal/offset block's."""
    return ranges or offset_ranges(q.shape[2], k.shape[2], causal, q_offset, k_offset)


def forward(impl, q, k, v, monkeypatch, block=None, **mask):
    """(out, lse) of one block. Kernel: through the launcher into NaN-poisoned buffers, with
    block x block tiles so small shapes still span several tiles."""
    if impl == "torch":
        monkeypatch.setenv("PARALLELKIT_TRITON", "0")
        return attention_block_forward(q, k, v, **mask)
    out = torch.full(q.shape, float("nan"), device=q.device)
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    ranges = kernel_ranges(q, k, **mask)
    result = flash.flash_attention_block_forward(q, k, v, ranges.key_start, ranges.key_end,
                                                 out=out, lse=lse, block_m=block, block_n=block)
    assert result[0] is out and result[1] is lse
    return out, lse


def backward(impl, q, k, v, out, dout, lse, monkeypatch, block=None, **mask):
    if impl == "torch":
        monkeypatch.setenv("PARALLELKIT_TRITON", "0")
        return attention_block_backward(q, k, v, out, dout, lse, **mask)
    dq = torch.full(q.shape, float("nan"), device=q.device)
    dk, dv = (torch.full(k.shape, float("nan"), device=q.device) for _ in range(2))
    r = kernel_ranges(q, k, **mask)
    return flash.flash_attention_block_backward(
        q, k, v, out, dout, lse, r.key_start, r.key_end, r.query_start, r.query_end, dq=dq,
        dk=dk, dv=dv, block_m=block, block_n=block)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# (B, H, Hkv, Sq, Sk, D, causal, q_offset, k_offset, tile size for the kernel or None)
FORWARD_CASES = {
    "one query, one key": (1, 1, 1, 1, 1, 16, False, 0, 0, None),
    "Sq != Sk, ragged tiles, GQA": (2, 4, 2, 37, 50, 32, False, 0, 0, 16),
    "diagonal block, MQA": (1, 4, 1, 40, 40, 16, True, 40, 40, 16),
    "block in the past": (1, 2, 2, 24, 33, 64, True, 64, 0, None),
    "block in the future": (1, 2, 1, 16, 20, 16, True, 0, 32, None),
    "zigzag: keys just before": (1, 4, 2, 20, 28, 128, True, 60, 50, 16),
    "zigzag: early rows see none": (1, 2, 2, 30, 20, 64, True, 10, 25, 16),
    "no keys": (1, 2, 2, 5, 0, 16, False, 0, 0, None),
}


@pytest.mark.parametrize("impl,dtype", IMPLS)
@pytest.mark.parametrize("case", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_forward_matches_reference(impl, dtype, case, monkeypatch):
    b, h, h_kv, s_q, s_k, d, causal, q_offset, k_offset, block = case
    q, k, v = make_qkv(b, h, h_kv, s_q, s_k, d, dtype)
    mask = dict(causal=causal, q_offset=q_offset, k_offset=k_offset)
    expected_out, expected_lse = attention_block_reference(q, k, v, **mask)

    out, lse = forward(impl, q, k, v, monkeypatch, block, **mask)

    assert out.dtype == lse.dtype == acc_dtype(dtype)
    terms = s_k + d
    torch.testing.assert_close(out.double(), expected_out, **out_tolerance(dtype, terms))
    torch.testing.assert_close(lse.double(), expected_lse, **lse_tolerance(dtype, terms))
    # Rows with no visible key: exactly 0 and -inf (assert_close already ruled out NaN).
    dead = expected_lse == NEG_INF
    assert torch.equal(lse[dead], expected_lse[dead].to(lse.dtype))
    assert not out[dead].any()


def merged_forward(impl, q, k, v, key_blocks, q_offset, causal, monkeypatch):
    """Attention of q over all keys k, v: [B, Hkv, Sk, D], computed block by block (keys split
    into key_blocks sizes, at their global offsets) and merged as ring attention does."""
    out = torch.zeros(q.shape, dtype=acc_dtype(q.dtype))
    lse = torch.full(q.shape[:3], NEG_INF, dtype=acc_dtype(q.dtype))
    k_offset = 0
    for k_block, v_block in zip(k.split(key_blocks, 2), v.split(key_blocks, 2)):
        block_out, block_lse = forward(impl, q, k_block, v_block, monkeypatch, causal=causal,
                                       q_offset=q_offset, k_offset=k_offset)
        merge_attention_partials_(out, lse, block_out, block_lse)
        k_offset += k_block.shape[2]
    return out, lse


@pytest.mark.parametrize("impl,dtype", GRAD_IMPLS)
@pytest.mark.parametrize("s_q,q_offset", [(45, 0), (25, 20)], ids=["all queries", "last queries"])
def test_merged_blocks_equal_attention_over_all_keys(impl, dtype, s_q, q_offset, monkeypatch):
    # Keys in 3 uneven blocks: for early queries the later blocks are entirely masked (-inf rows
    # that the merge must skip), which checks the lse convention end to end.
    q, k, v = make_qkv(1, 4, 2, 45, 45, 32, dtype, seed=1)
    q = q[:, :, q_offset:q_offset + s_q]
    expected_out, expected_lse = attention_block_reference(q, k, v, True, q_offset, 0)

    out, lse = merged_forward(impl, q, k, v, [15, 20, 10], q_offset, True, monkeypatch)

    terms = 45 + 32  # keys, head dim
    torch.testing.assert_close(out.double(), expected_out, **out_tolerance(dtype, terms))
    torch.testing.assert_close(lse.double(), expected_lse, **lse_tolerance(dtype, terms))


@pytest.mark.parametrize("impl,dtype", GRAD_IMPLS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("h,h_kv", [(2, 2), (4, 1)], ids=["MHA", "GQA-4to1"])
def test_block_gradients_sum_to_full_attention_gradients(impl, dtype, causal, h, h_kv,
                                                         monkeypatch):
    # Queries at positions [16, 40), keys [0, 40) in blocks of 16 (all in the past), 10 (the
    # diagonal) and 14 (partly in the future, invisible to the first 10 queries).
    key_blocks, q_offset = [16, 10, 14], 16
    q, k, v = make_qkv(2, h, h_kv, 40, 40, 32, dtype, seed=2)
    q = q[:, :, q_offset:]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    expected_out, _ = attention_block_reference(q64, k64, v64, causal, q_offset, 0)
    expected_out.backward(dout.double())

    out, lse = merged_forward(impl, q, k, v, key_blocks, q_offset, causal, monkeypatch)
    dq, dks, dvs, k_offset = 0, [], [], 0
    for k_block, v_block in zip(k.split(key_blocks, 2), v.split(key_blocks, 2)):
        grads = backward(impl, q, k_block, v_block, out, dout, lse, monkeypatch, block=16,
                         causal=causal, q_offset=q_offset, k_offset=k_offset)
        assert all(g.dtype == acc_dtype(dtype) for g in grads)
        dq = dq + grads[0]
        dks.append(grads[1])
        dvs.append(grads[2])
        k_offset += k_block.shape[2]

    terms = 40 + 32 + 24 * h // h_kv  # keys, head dim, the queries sharing a KV head
    for name, actual, expected in (("dq", dq, q64.grad), ("dk", torch.cat(dks, 2), k64.grad),
                                   ("dv", torch.cat(dvs, 2), v64.grad)):
        torch.testing.assert_close(actual.double(), expected, **out_tolerance(dtype, terms),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_backward_rows_without_keys_contribute_nothing(impl, monkeypatch):
    # Rows whose final lse is -inf (finite garbage in out/dout there) and a block every row of
    # which is masked give exact zeros, never NaN.
    q, k, v = make_qkv(1, 4, 2, 24, 20, 16, torch.float32, seed=4)
    out, dout = torch.randn(q.shape), torch.randn(q.shape)
    lse = torch.randn(q.shape[:3])
    lse[:, :, ::3] = NEG_INF

    dq, dk, dv = backward(impl, q, k, v, out, dout, lse, monkeypatch, causal=False)
    assert not dq[:, :, ::3].any()
    live = torch.ones(24, dtype=torch.bool)
    live[::3] = False
    dq_live, dk_live, dv_live = backward(impl, q[:, :, live], k, v, out[:, :, live],
                                         dout[:, :, live], lse[:, :, live], monkeypatch,
                                         causal=False)
    torch.testing.assert_close(dq[:, :, live], dq_live)
    torch.testing.assert_close((dk, dv), (dk_live, dv_live))

    grads = backward(impl, q, k, v, out, dout, torch.randn(q.shape[:3]), monkeypatch,
                     causal=True, q_offset=0, k_offset=24)
    assert not any(g.any() for g in grads)


def test_op_runs_the_kernels_when_asked(monkeypatch):
    calls = []
    for name in ("flash_attention_block_forward", "flash_attention_block_backward"):
        def spy(*args, _launcher=getattr(flash, name), **kwargs):
            calls.append(_launcher.__name__)
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(flash, name, spy)
    monkeypatch.setenv("PARALLELKIT_TRITON", "1")
    q, k, v = make_qkv(1, 2, 1, 8, 8, 16, torch.float32)
    v = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # D not contiguous: the op copies
    out, lse = attention_block_forward(q, k, v, causal=True)
    attention_block_backward(q, k, v, out, torch.ones_like(q), lse, causal=True)
    assert calls == ["flash_attention_block_forward", "flash_attention_block_backward"]
    q, k, v = (t.double() for t in (q, k, v))  # float64: always the torch path
    attention_block_forward(q, k, v, causal=True)
    assert len(calls) == 2


def _bad_inputs():
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)

    def forward_args(**change):
        return dict(q=q, k=k, v=k) | change

    def backward_args(**change):
        return dict(forward_args(), out=q, dout=q, lse=torch.zeros(1, 4, 8)) | change

    return [
        (forward_args(q=torch.zeros(4, 8, 16)), r"q must be 4-D \[B, heads, S, D\]"),
        (forward_args(v=torch.zeros(1, 2, 9, 16)), r"k and v must have the same shape"),
        (forward_args(k=torch.zeros(1, 2, 8, 8), v=torch.zeros(1, 2, 8, 8)),
         r"must agree in B and D"),
        (forward_args(k=torch.zeros(1, 3, 8, 16), v=torch.zeros(1, 3, 8, 16)),
         r"H = 4 must be a multiple of kv heads Hkv = 3"),
        (forward_args(k=k.bfloat16()), r"must share one dtype.*cast them with .to\(q.dtype\)"),
        (forward_args(q=q.int(), k=k.int(), v=k.int()), r"must share one dtype"),
        (forward_args(v=k.to("meta")), r"must be on one device"),
        (backward_args(lse=torch.zeros(1, 4, 9)), r"lse must have shape \[1, 4, 8\]"),
        (backward_args(dout=torch.zeros(1, 4, 8, 8)), r"dout must have shape \[1, 4, 8, 16\]"),
        (backward_args(out=q.long()), r"out must be floating point"),
    ]


@pytest.mark.parametrize("args,message", _bad_inputs())
def test_bad_input_is_rejected_with_a_clear_message(args, message):
    op = attention_block_backward if "dout" in args else attention_block_forward
    with pytest.raises(ValueError, match=message):
        op(**args, causal=True)


def test_kernel_limits_are_explained(monkeypatch):
    monkeypatch.setenv("PARALLELKIT_TRITON", "1")
    q = torch.zeros(1, 1, 4, 256)
    with pytest.raises(ValueError, match=r"head dim 256 exceeds the Triton kernels' maximum 128"
                                         r".*PARALLELKIT_TRITON=0"):
        attention_block_forward(q, q, q, causal=False)
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[1, 1, 4, 16\]"):
        ranges = offset_ranges(4, 4, False)
        flash.flash_attention_block_forward(q, q, q, ranges.key_start, ranges.key_end,
                                            out=torch.zeros(1, 1, 4, 8))


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The launchers take the tiles they take on a GPU (the kernels still run in the
    interpreter, which by itself takes tiles as long as the sequence); yields those used."""
    choose, used = flash._launch_config, []

    def on_gpu(kernel, device, *args):
        used.append((kernel, choose(kernel, torch.device("cuda"), *args)))
        return used[-1][1]

    monkeypatch.setattr(flash, "_launch_config", on_gpu)
    return used


# (B, H, Hkv, Sq, Sk, D, causal, q_offset, k_offset): a few GPU tiles each way with ragged ends,
# so the GPU's masks, causal tile-skipping and dk/dv's first query tile (rounded down to its own
# tile size, which differs from the key tile's) run as on the GPU.
GPU_TILING_CASES = {
    "diagonal block, GQA": (1, 4, 2, 100, 100, 64, True, 0, 0),
    "zigzag: early rows see none": (1, 2, 2, 70, 90, 128, True, 10, 40),
    "block in the past, MQA": (1, 2, 1, 75, 130, 32, False, 200, 0),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", GPU_TILING_CASES.values(), ids=GPU_TILING_CASES.keys())
def test_gpu_tiles_in_the_interpreter(dtype, case, gpu_tiles, monkeypatch):
    # bf16 inputs take the tensor-core tiles, float32 ones the FMA tiles (the interpreter's dots
    # are float32 either way). One block holding every key: its gradients are the full ones.
    b, h, h_kv, s_q, s_k, d, causal, q_offset, k_offset = case
    q, k, v = make_qkv(b, h, h_kv, s_q, s_k, d, dtype, seed=6)
    mask = dict(causal=causal, q_offset=q_offset, k_offset=k_offset)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    expected_out, expected_lse = attention_block_reference(q64, k64, v64, **mask)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    expected_out.backward(dout.double())

    out, lse = forward("triton", q, k, v, monkeypatch, **mask)
    grads = backward("triton", q, k, v, out, dout, lse, monkeypatch, **mask)

    terms = s_k + d + s_q * h // h_kv  # keys, head dim, the queries sharing a KV head
    torch.testing.assert_close(out.double(), expected_out.detach(), **out_tolerance(dtype, terms))
    torch.testing.assert_close(lse.double(), expected_lse.detach(), **lse_tolerance(dtype, terms))
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(actual.double(), expected, **out_tolerance(dtype, terms),
                                   msg=lambda m, name=name: f"{name}: {m}")
    tensor_cores = dtype != torch.float32
    assert {kernel: (tiles.block_m, tiles.block_n) for kernel, tiles in gpu_tiles} == {
        kernel: (tiles.block_m, tiles.block_n) for (kernel, cores, small), tiles in
        ATTENTION_TILES.items() if cores == tensor_cores and small == (d <= 64)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_compiled_kernels_match_reference(dtype, d):
    # Sizes that span several 64-wide tiles, ragged, with a causal zigzag-like offset and GQA.
    q, k, v = make_qkv(2, 8, 2, 300, 257, d, dtype, device="cuda", seed=5)
    mask = dict(causal=True, q_offset=200, k_offset=150)
    out, lse = attention_block_forward(q, k, v, **mask)
    expected_out, expected_lse = attention_block_reference(q, k, v, **mask)
    terms = 257 + d + 300 * 4  # keys, head dim, the queries sharing a KV head
    torch.testing.assert_close(out.double(), expected_out, **out_tolerance(dtype, terms))
    torch.testing.assert_close(lse.double(), expected_lse, **lse_tolerance(dtype, terms))

    # One block holding all the keys: its gradients are the full attention's.
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    attention_block_reference(q64, k64, v64, **mask)[0].backward(dout.double())
    grads = attention_block_backward(q, k, v, out, dout, lse, **mask)
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(actual.double(), expected, **out_tolerance(dtype, terms),
                                   msg=lambda m, name=name: f"{name}: {m}")
