"""Bad input to every public entry point: one row per case, the call, the exception type and the
words its message must contain (the value and the fix). Each row runs on 2 gloo ranks, most under
an MPU with tp=2; every rank must raise (none may hang, abort or compute something wrong).

Cases whose error needs the ranks to compare notes (sizes that differ between ranks, a rank that
dies) live in test_ranks_agree.py, test_faults.py and test_checkpoint_faults.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parallelkit import mpu
from parallelkit.context_parallel import ContextParallelAttention, split_for_context_parallel
from parallelkit.data_parallel import DistributedDataParallel, clip_grad_norm_
from parallelkit.distributed import comm
from parallelkit.launch import LocalWorld
from parallelkit.ops import vocab_parallel_cross_entropy
from parallelkit.parallelize import parallelize
from parallelkit.pipeline_parallel import build_schedule, partition_layers
from parallelkit.tensor_parallel import (ColumnParallelLinear, ParallelLayerNorm, ParallelRMSNorm,
                                         RowParallelLinear, VocabParallelCrossEntropy,
                                         VocabParallelEmbedding, get_rng_tracker)
from parallelkit.testing import run_on_ranks
from parallelkit.models.tinylm import TinyConfig, TinyLM

NO_MPU = None  # the row runs before mpu.initialize
TP2 = dict(tp=2)
SP = dict(sequence_parallel=True)


def _relayout(build):
    """Build under tp=2, then re-initialize the MPU as dp=2 (tp=1) and call the layer."""
    layer = build()
    mpu.destroy()
    mpu.initialize(tp=1)
    return layer


def _after_destroy(build):
    layer = build()
    mpu.destroy()
    return layer


def _call(layer, *args):
    return layer(*args)


# id: (MPU sizes or NO_MPU, the call, exception type, regex its message must match)
CASES = {
    # --- the MPU -----------------------------------------------------------------------------
    "getter before initialize": (NO_MPU, lambda: mpu.get_tp_group(), ValueError,
                                 r"not initialized: call parallelkit.mpu.initialize"),
    "tp not dividing the world": (NO_MPU, lambda: mpu.initialize(tp=3), ValueError,
                                  r"world_size=2 is not divisible by tp\*pp\*cp = 3\*1\*1"),
    "tp zero": (NO_MPU, lambda: mpu.initialize(tp=0), ValueError, r"tp=0 must be an integer >= 1"),
    "tp fractional": (NO_MPU, lambda: mpu.initialize(tp=1.5), ValueError,
                      r"tp=1.5 must be an integer >= 1"),
    "dp inconsistent": (NO_MPU, lambda: mpu.initialize(tp=1, dp=4), ValueError,
                        r"does not equal world_size=2; leave dp=None"),
    "unknown order": (NO_MPU, lambda: mpu.initialize(tp=2, order="tp-xx-dp-pp"), ValueError,
                      r"unknown parallelism"),
    "virtual_pp without pp": (NO_MPU, lambda: mpu.initialize(virtual_pp=2), ValueError,
                              r"virtual_pp=2 must be None or an integer >= 1, and > 1 only with pp"),
    "initialize twice": (TP2, lambda: mpu.initialize(tp=2), ValueError,
                         r"already initialized .* call parallelkit.mpu.destroy\(\)"),
    "layer without MPU or group": (NO_MPU, lambda: ColumnParallelLinear(8, 8), ValueError,
                                   r"not initialized: call parallelkit.mpu.initialize"),
    "CP attention without MPU": (NO_MPU, lambda: ContextParallelAttention(), ValueError,
                                 r"not initialized"),
    # --- a layer outliving its MPU -----------------------------------------------------------
    "layer after re-initialize": (
        TP2, lambda: _call(_relayout(lambda: ColumnParallelLinear(8, 8)), torch.randn(2, 8)),
        RuntimeError, r"ColumnParallelLinear was built on the MPU's tp group \(ranks \[0, 1\]\), "
                      r"but the MPU has been initialized again .* now ranks \[\d\]"),
    "norm after destroy": (
        TP2, lambda: _call(_after_destroy(lambda: ParallelRMSNorm(8)), torch.randn(2, 4)),
        RuntimeError, r"ParallelRMSNorm was built .* parallelkit.mpu has been destroyed since: build"),
    "embedding after re-initialize": (
        TP2, lambda: _call(_relayout(lambda: VocabParallelEmbedding(8, 4)),
                           torch.zeros(2, dtype=torch.long)),
        RuntimeError, r"VocabParallelEmbedding was built .* pass tp_group= explicitly"),
    "loss after re-initialize": (
        TP2, lambda: _call(_relayout(VocabParallelCrossEntropy), torch.randn(2, 4),
                           torch.zeros(2, dtype=torch.long)),
        RuntimeError, r"VocabParallelCrossEntropy was built on the MPU's tp group"),
    # --- column / row parallel linear ----------------------------------------------------------
    "column out_features not divisible": (TP2, lambda: ColumnParallelLinear(8, 7), ValueError,
                                          r"out_features=7 is not divisible by the "
                                          r"tensor-parallel size tp=2"),
    "row in_features not divisible": (TP2, lambda: RowParallelLinear(7, 8), ValueError,
                                      r"in_features=7 is not divisible by .* tp=2"),
    "features zero": (TP2, lambda: ColumnParallelLinear(0, 8), ValueError,
                      r"in_features=0 must be an integer >= 1"),
    "chunks_per_rank fractional": (
        TP2, lambda: ColumnParallelLinear(8, 8, **SP, overlap_comm=True, chunks_per_rank=1.5),
        ValueError, r"chunks_per_rank=1.5 must be an integer >= 1"),
    "overlap without sequence parallel": (TP2, lambda: RowParallelLinear(8, 8, overlap_comm=True),
                                          ValueError, r"needs sequence_parallel=True"),
    "row SP without parallel input": (TP2, lambda: RowParallelLinear(8, 8, **SP), ValueError,
                                      r"needs input_is_parallel=True"),
    "input of another dtype": (
        TP2, lambda: ColumnParallelLinear(8, 8)(torch.randn(2, 8, dtype=torch.float64)),
        TypeError, r"torch.float32 parameters but got a torch.float64 input; cast the input"),
    "integer input": (TP2, lambda: RowParallelLinear(8, 8)(torch.ones(2, 8, dtype=torch.long)),
                      TypeError, r"expects a floating-point input, got torch.int64"),
    "input on another device": (TP2, lambda: ColumnParallelLinear(8, 8)(torch.randn(2, 8,
                                                                                    device="meta")),
                                ValueError, r"parameters on cpu but got an input on meta"),
    "input features wrong": (TP2, lambda: ColumnParallelLinear(8, 8)(torch.randn(2, 7)),
                             ValueError, r"expects inputs \[..., 8\] .* got shape \(2, 7\)"),
    "row parallel input features wrong": (
        TP2, lambda: RowParallelLinear(8, 8, input_is_parallel=True)(torch.randn(2, 8)),
        ValueError, r"expects inputs \[..., 4\] \(this rank's 1/2 slice\)"),
    "SP sequence not divisible": (
        TP2, lambda: RowParallelLinear(8, 8, input_is_parallel=True, **SP)(torch.randn(3, 1, 4)),
        ValueError, r"s=3 is not divisible by 2; pad the sequence"),
    "from_dense of a non-Linear": (TP2, lambda: ColumnParallelLinear.from_dense(nn.Conv1d(2, 2, 1)),
                                   TypeError, r"expects an nn.Linear, got Conv1d"),
    # --- vocab-parallel embedding ----------------------------------------------------------------
    "vocab not divisible": (TP2, lambda: VocabParallelEmbedding(7, 4), ValueError,
                            r"num_embeddings \(vocab\)=7 is not divisible by .* tp=2"),
    "padding_idx out of range": (TP2, lambda: VocabParallelEmbedding(8, 4, padding_idx=8),
                                 ValueError, r"padding_idx=8 must be in \[-8, 8\)"),
    "token id out of range": (TP2, lambda: VocabParallelEmbedding(8, 4)(torch.tensor([[9]])),
                              IndexError, r"token ids must be in \[0, 8\), got min 9"),
    "float token ids": (TP2, lambda: VocabParallelEmbedding(8, 4)(torch.zeros(2, 2)), TypeError,
                        r"int64 or int32 ids, got torch.float32; pass ids.long\(\)"),
    "embedding from a Linear": (TP2, lambda: VocabParallelEmbedding.from_dense(nn.Linear(2, 2)),
                                TypeError, r"expects an nn.Embedding, got Linear"),
    # --- parallel norms ----------------------------------------------------------------------------
    "negative eps": (TP2, lambda: ParallelLayerNorm(8, eps=-1.0), ValueError,
                     r"ParallelLayerNorm eps=-1.0 must be a finite number > 0"),
    "NaN eps": (TP2, lambda: ParallelRMSNorm(8, eps=float("nan")), ValueError,
                r"eps=nan must be a finite number > 0 or None"),
    "hidden not divisible": (TP2, lambda: ParallelRMSNorm(7), ValueError,
                             r"hidden=7 is not divisible by .* tp=2"),
    "norm given the full hidden": (TP2, lambda: ParallelLayerNorm(8)(torch.randn(2, 8)),
                                   ValueError, r"expects this rank's hidden slice \[..., 4\]"),
    "norm of integers": (TP2, lambda: ParallelRMSNorm(8)(torch.ones(2, 4, dtype=torch.long)),
                         TypeError, r"floating-point input"),
    "norm from the wrong kind": (TP2, lambda: ParallelLayerNorm.from_dense(nn.RMSNorm(8)),
                                 TypeError, r"takes nn.LayerNorm, got RMSNorm"),
    # --- vocab-parallel cross-entropy ------------------------------------------------------------
    "label smoothing 1": (TP2, lambda: VocabParallelCrossEntropy(label_smoothing=1.0), ValueError,
                          r"label_smoothing=1.0 must be in \[0, 1\)"),
    "unknown reduction": (TP2, lambda: VocabParallelCrossEntropy(reduction="avg"), ValueError,
                          r"reduction='avg' must be one of"),
    "integer logits": (TP2, lambda: vocab_parallel_cross_entropy(
        torch.ones(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long)), TypeError,
        r"logits must be floating point"),
    "float targets": (TP2, lambda: vocab_parallel_cross_entropy(torch.randn(2, 4), torch.zeros(2)),
                      TypeError, r"targets must be integer class ids, got torch.float32"),
    # --- context parallelism ---------------------------------------------------------------------
    "unknown CP layout": (TP2, lambda: ContextParallelAttention(layout="spiral"), ValueError,
                          r"layout='spiral' must be one of"),
    "unknown CP mode": (TP2, lambda: ContextParallelAttention(mode="tree"), ValueError,
                        r"mode='tree' must be one of"),
    "sequence not splittable": (NO_MPU, lambda: split_for_context_parallel(torch.zeros(1, 6), 0, 4),
                                ValueError, r"a sequence of 6 tokens cannot be split"),
    # --- whole-model conversion --------------------------------------------------------------------
    "unknown style": (TP2, lambda: parallelize(TinyLM(TinyConfig()), {"embed": "sideways"}),
                      ValueError, r"unknown parallel style\(s\) \['sideways'\]"),
    "plan matching nothing": (TP2, lambda: parallelize(TinyLM(TinyConfig()), {"nope": "colwise"}),
                              ValueError, r"plan pattern\(s\) \['nope'\] matched no module"),
    "no plan for the model": (TP2, lambda: parallelize(nn.Sequential(nn.Linear(4, 4))),
                              ValueError, r"no built-in plan for Sequential"),
    # --- pipeline, data parallel, RNG, communication, launcher -----------------------------------
    "unknown schedule": (NO_MPU, lambda: build_schedule("2f2b", 2, 4), ValueError,
                         r"unknown schedule '2f2b'"),
    "too few layers for the stages": (NO_MPU, lambda: partition_layers([nn.Identity()] * 3, 4),
                                      ValueError, r"cannot split 3 layers into 4 pipeline stages"),
    "clip with a bad norm": (TP2, lambda: clip_grad_norm_([nn.Parameter(torch.ones(2))], 1.0,
                                                          norm_type=-1),
                             ValueError, r"norm_type=-1 must be a positive number or inf"),
    "DDP without MPU or group": (NO_MPU, lambda: DistributedDataParallel(nn.Linear(2, 2)),
                                 ValueError, r"not initialized"),
    "RNG tracker not seeded": (TP2, lambda: get_rng_tracker(), ValueError,
                               r"tracker is not set up: call .*model_parallel_seed\(seed\) first"),
    "unknown reduce op": (TP2, lambda: comm.all_reduce(torch.ones(2), mpu.get_tp_group(), "avg"),
                          ValueError, r"op='avg' must be one of"),
    "world of zero ranks": (NO_MPU, lambda: LocalWorld(0), ValueError,
                            r"world_size=0 must be an integer >= 1"),
}


def _check(case_id: str) -> None:
    sizes, call, error, words = CASES[case_id]
    if sizes is not NO_MPU:
        mpu.initialize(**sizes)
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("case_id", CASES)
def test_bad_input_gets_a_clear_error(case_id):
    run_on_ranks(_check, 2, case_id, timeout=30)

