"""The launches the check compiles: the ops' real launchers at the shapes of real models and of
the GPU tests (``pytest -m gpu``).

Each case calls the launchers of ``parallelkit.kernels`` the way ``parallelkit.ops`` does, on
fake CUDA tensors; the launchers choose tiles, warps, stages and grids themselves. Names are
``op/variant/...`` so that ``--only REGEX`` picks a subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[], None]  # calls launchers on fake CUDA tensors (inside record.recording)


def _cuda(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda")


# --- norms: parallelkit.ops.norms.ParallelNormFunction's calls --------------------------------

def _norm_case(rows: int, hidden: int, tp: int, rms: bool, dtype: torch.dtype,
               weight_dtype: torch.dtype, residual: bool, tag: str = "",
               affine: bool = True) -> Case:
    """tp = 1: the fused forward and backward; tp > 1: statistics, apply, sums and dx of one
    rank's H/tp columns (the collectives between them are the caller's). ``affine``: a weight
    (and LayerNorm's bias)."""
    def run():
        from parallelkit.kernels import norms

        n = hidden // tp
        x, dy = _cuda((rows, n), dtype), _cuda((rows, n), dtype)
        res = _cuda((rows, n), dtype) if residual else None
        ds = _cuda((rows, n), dtype) if residual else None  # the new residual stream's grad
        weight = _cuda((n,), weight_dtype) if affine else None
        bias = None if rms or not affine else _cuda((n,), weight_dtype)
        if tp == 1:
            s, _, mean, rstd = norms.fused_norm_forward(x, res, weight, bias, 1e-5, rms=rms)
            norms.fused_norm_backward(s, dy, weight, mean, rstd, ds, rms=rms,
                                      has_bias=bias is not None)
            return
        s, stats = norms.norm_stats_forward(x, res, rms=rms)
        mean, rstd = (None if rms else stats[0].clone()), stats[-1].clone()  # all-reduced
        norms.norm_apply_forward(s, weight, bias, mean, rstd, rms=rms)
        sums = norms.norm_sums_backward(s, dy, weight, mean, rstd, rms=rms).clone()
        norms.norm_dx_backward(s, dy, weight, mean, rstd, sums, hidden, ds, rms=rms,
                               has_bias=bias is not None)

    dtypes = DTYPE_NAMES[dtype] + ("" if weight_dtype == dtype else
                                   f"+{DTYPE_NAMES[weight_dtype]}-weight")
    name = (f"norm/{'rms' if rms else 'layer'}/tp{tp}/H{hidden}/{dtypes}/"
            f"{'residual' if residual else 'plain'}{'' if affine else '/no-weight'}/T{rows}{tag}")
    return Case(name, run)


def norm_cases() -> list[Case]:
    cases = []
    for rms in (False, True):
        for hidden in (4096, 8192):
            for tp in (1, 2, 8):
                # Every dtype on the fused path, the two extremes on the split one.
                dtypes = (((BF16, BF16), (FP16, FP16), (FP32, FP32), (BF16, FP32)) if tp == 1
                          else ((BF16, BF16), (FP32, FP32)))
                for dtype, weight_dtype in dtypes:
                    for residual in (False, True):
                        cases.append(_norm_case(8192, hidden, tp, rms, dtype, weight_dtype,
                                                residual))
        # float64 runs the kernels too (float64 statistics): the fused path
        cases.append(_norm_case(8192, 4096, 1, rms, FP64, FP64, True))
    # tests/distributed/test_gpu_single_device.py: RMSNorm of [48, 512] over tp = 2, and both
    # norm layers at tp = 1 on [512, 3072] with the residual add
    cases += [_norm_case(48, 512, 2, True, dtype, dtype, False, tag="/gpu-test")
              for dtype in (FP32, BF16)]
    cases += [_norm_case(512, 3072, 1, rms, dtype, dtype, True, tag="/gpu-test")
              for rms in (False, True) for dtype in (FP32, BF16)]
    # tests/ops/test_norm_kernels_gpu.py: fused (rows of 1 and 2 blocks), mixed precision, the
    # sharded steps of two ranks, and LayerNorm without weight on rows of 1e4 + noise
    for rms in (False, True):
        cases += [_norm_case(rows, hidden, 1, rms, dtype, dtype, True, tag="/gpu-test")
                  for rows, hidden, dtype in ((2048, 4096, BF16), (2048, 4096, FP32),
                                              (333, 12288, BF16), (333, 12288, FP32),
                                              (7, 1000, FP16), (7, 1000, FP64))]
        cases.append(_norm_case(1024, 4096, 1, rms, BF16, FP32, True, tag="/gpu-test"))
        cases += [_norm_case(rows, hidden, 2, rms, dtype, dtype, True, tag="/gpu-test")
                  for rows, hidden, dtype in ((1024, 8192, BF16), (300, 20000, FP32))]
    cases += [_norm_case(64, hidden, 1, False, FP32, FP32, False, tag="/gpu-test", affine=False)
              for hidden in (4096, 16384)]
    return cases


# --- cross-entropy: parallelkit.ops.cross_entropy.VocabParallelCrossEntropyFunction's calls ---

def _cross_entropy_case(tokens: int, n_local: int, vocab_start: int, dtype: torch.dtype,
                        block_v: int | None = None, tag: str = "") -> Case:
    def run():
        from parallelkit.kernels.cross_entropy import (cross_entropy_backward,
                                                       cross_entropy_stats_forward)

        logits = _cuda((tokens, n_local), dtype)
        targets = _cuda((tokens,), torch.int64)
        stats = cross_entropy_stats_forward(logits, targets, vocab_start, block_v=block_v)
        row_max, log_sum, grad_row = (stats[i].clone() for i in range(3))  # all-reduced
        cross_entropy_backward(logits, targets, row_max, log_sum, grad_row, vocab_start,
                               2 * n_local, 0.1, -100, inplace=True, block_v=block_v)

    blocks = "" if block_v is None else f"/BLOCK_V{block_v}"
    return Case(f"cross_entropy/V{n_local}@{vocab_start}/T{tokens}/{DTYPE_NAMES[dtype]}"
                f"{blocks}{tag}", run)


def cross_entropy_cases() -> list[Case]:
    # Per-rank vocabularies: Llama-2's 32000 (tp = 1), Llama-3's 128256 over tp = 2.
    cases = [_cross_entropy_case(tokens, n_local, start, dtype)
             for n_local, start in ((32000, 0), (64128, 64128))
             for tokens in (4096, 16384) for dtype in (BF16, FP16, FP32)]
    # tests/ops/test_cross_entropy_kernels.py on cuda: CASES and the hard-logits slice, with
    # their BLOCK_V; tests/distributed/test_gpu_single_device.py: [64, 500] float32 at both
    # ranks' offsets.
    test_shapes = [(1, 7, 0, None), (37, 1000, 0, None), (19, 100, 100, 32),
                   (300, 2500, 2500, None), (64, 300, 300, 128), (64, 500, 0, None),
                   (64, 500, 500, None)]
    cases += [_cross_entropy_case(tokens, n_local, start, dtype, block_v, tag="/gpu-test")
              for tokens, n_local, start, block_v in test_shapes for dtype in (BF16, FP16, FP32)]
    return cases


# --- attention: parallelkit.ops.attention_block, as ring attention calls it --------------------

def _attention_case(shape: tuple, dtype: torch.dtype, causal: bool, q_offset: int,
                    k_offset: int, label: str, dout_dtype: torch.dtype | None = None) -> Case:
    """One block's forward and backward; shape (B, H, Hkv, Sq, Sk, D)."""
    def run():
        from parallelkit.ops.attention_block import (attention_block_backward,
                                                     attention_block_forward)

        batch, heads, kv_heads, seq_q, seq_k, head_dim = shape
        q = _cuda((batch, heads, seq_q, head_dim), dtype)
        k, v = (_cuda((batch, kv_heads, seq_k, head_dim), dtype) for _ in range(2))
        mask = dict(causal=causal, q_offset=q_offset, k_offset=k_offset)
        out, lse = attention_block_forward(q, k, v, **mask)
        dout = torch.empty_like(q, dtype=dout_dtype or dtype)
        attention_block_backward(q, k, v, out, dout, lse, **mask)

    dtypes = DTYPE_NAMES[dtype] + (f"+{DTYPE_NAMES[dout_dtype]}-dout" if dout_dtype else "")
    return Case(f"attention/D{shape[-1]}/{dtypes}/{label}", run)


def attention_cases() -> list[Case]:
    cases = []
    for head_dim in (64, 128):
        for dtype in (BF16, FP16, FP32):
            cases += [
                # a ring's diagonal block: GQA (Llama), 4096-token chunks, causal
                _attention_case((1, 32, 8, 4096, 4096, head_dim), dtype, True, 4096, 4096,
                                "gqa-causal-diagonal"),
                # an earlier chunk's keys: MHA (GPT-NeoX), nothing masked
                _attention_case((1, 16, 16, 4096, 4096, head_dim), dtype, False, 8192, 0,
                                "mha-past-block"),
                # tests/ops/test_attention_block.py::test_compiled_kernels_match_reference
                _attention_case((2, 8, 2, 300, 257, head_dim), dtype, True, 200, 150,
                                "ragged/gpu-test"),
            ]
        # ring attention's backward passes dout in out's float32 next to 16-bit q, k, v
        for dtype in (BF16, FP16):
            cases.append(_attention_case((1, 32, 8, 4096, 4096, head_dim), dtype, True, 4096,
                                         4096, "ring-backward", dout_dtype=FP32))
    return cases


def all_cases() -> list[Case]:
    return norm_cases() + cross_entropy_cases() + attention_cases()
