"""The training entry point: a run stopped at a checkpoint and resumed equals the uninterrupted
run bit for bit (losses and weights); bad configs fail before any rank starts; the CLI runs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from parallelkit.checkpoint import load_checkpoint
from parallelkit.testing import run_on_ranks
from parallelkit.train import TrainConfig, train
from parallelkit.train.model import build_dense, model_spec

TINY = dict(vocab=32, hidden=16, ffn=32, layers=2, heads=4, dropout=0.1, attention_dropout=0.1)


def _interrupted_and_whole(tmp_path, cfg: TrainConfig, world: int, stop: int, timeout=240):
    """An uninterrupted run, and one stopped after ``stop`` steps then resumed; both results
    (rank 0's) and both final checkpoints' weights, loaded into the dense model here."""
    whole = run_on_ranks(train, world, cfg.replace(checkpoint_dir=str(tmp_path / "whole")),
                         timeout=timeout)[0]
    parted = cfg.replace(checkpoint_dir=str(tmp_path / "parted"))
    first = run_on_ranks(train, world, parted.replace(stop_after=stop), timeout=timeout)[0]
    second = run_on_ranks(train, world, parted, timeout=timeout)[0]
    assert first.steps_run == list(range(1, stop + 1)) and first.resumed_from is None
    assert second.resumed_from == stop and second.steps_run == list(range(stop + 1, cfg.steps + 1))
    weights = []
    for run in ("whole", "parted"):
        dense = build_dense(model_spec(cfg), seed=123)  # other weights: the load must replace all
        load_checkpoint(str(tmp_path / run / f"step_{cfg.steps:07d}"), dense)
        weights.append(dict(dense.named_parameters()))
    return whole, second, weights


def _assert_bitwise(whole, resumed, weights, steps):
    assert list(whole.losses) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed.losses[step] == whole.losses[step], (step, whole.losses, resumed.losses)
    assert whole.losses[steps] < whole.losses[1]  # it trains
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_resume_is_bitwise_at_tp2_pp2_dp2_with_dropout(tmp_path):
    # TinyLM through 1F1B, two micro-batches per DP rank, dropout in and out of TP regions.
    cfg = TrainConfig(model="tinylm", model_args=TINY, tp=2, pp=2, steps=20, global_batch=4,
                      micro_batch=1, seq=8, warmup_steps=3, checkpoint_every=10, progress=False)
    whole, resumed, weights = _interrupted_and_whole(tmp_path, cfg, world=8, stop=10)
    _assert_bitwise(whole, resumed, weights, steps=20)
    assert "tp 2 x cp 1 x dp 2 x pp 2" in whole.layout


def test_resume_is_bitwise_at_tp2_cp2_dp2_llama(tmp_path):
    # A transformers Llama: sequence parallelism, ring attention over CP, the vocab-parallel
    # loss, selective recompute.
    cfg = TrainConfig(model="llama-tiny", model_args={"num_hidden_layers": 1, "hidden_size": 32,
                                                      "intermediate_size": 64, "vocab_size": 64},
                      tp=2, cp=2, steps=4, global_batch=4, micro_batch=1, seq=16,
                      recompute="selective", checkpoint_every=2, progress=False)
    whole, resumed, weights = _interrupted_and_whole(tmp_path, cfg, world=8, stop=2)
    _assert_bitwise(whole, resumed, weights, steps=4)


@pytest.mark.parametrize("precision, zero", [("bf16", True), ("fp16", False)])
def test_resume_is_bitwise_in_mixed_precision_from_a_token_file(tmp_path, precision, zero):
    # fp32 masters (ZeRO-1 shards of them), the fp16 loss scale, data from a nanoGPT-style file.
    (np.arange(2000, dtype=np.uint16) * 7 % 32).tofile(tmp_path / "train.bin")  # learnable
    cfg = TrainConfig(model="tinylm", model_args=TINY, tp=2, steps=4, global_batch=4,
                      micro_batch=1, seq=8, precision=precision, zero=zero, progress=False,
                      data=str(tmp_path / "train.bin"), checkpoint_every=2)
    whole, resumed, weights = _interrupted_and_whole(tmp_path, cfg, world=4, stop=2)
    _assert_bitwise(whole, resumed, weights, steps=4)


def test_a_checkpoint_of_another_run_layout_or_data_is_refused(tmp_path):
    data = tmp_path / "train.bin"
    (np.arange(200, dtype=np.uint16) % 32).tofile(data)
    cfg = TrainConfig(model="tinylm", model_args=TINY, tp=2, steps=2, global_batch=2, seq=8,
                      data=str(data), checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    run_on_ranks(train, 2, cfg, timeout=120)
    with pytest.raises(AssertionError, match=r"is of another run: lr was 0.003, now 0.01"):
        run_on_ranks(train, 2, cfg.replace(lr=0.01), timeout=120)
    with pytest.raises(AssertionError, match=r"was saved at .*'tp': 2.*this run is .*'tp': 1"):
        run_on_ranks(train, 2, cfg.replace(tp=1), timeout=120)
    (np.arange(400, dtype=np.uint16) % 32).tofile(data)  # the same path, other data
    with pytest.raises(AssertionError, match=r"'samples_per_epoch': 24}, but this run's data "
                                             r"would be at .*'samples_per_epoch': 49}"):
        run_on_ranks(train, 2, cfg, timeout=120)


@pytest.mark.parametrize("changes, error", [
    (dict(global_batch=6, micro_batch=2), r"global_batch=6 is not divisible by micro_batch x dp"
                                          r" = 2 x 2 = 4"),
    (dict(cp=2, tp=1, seq=18), r"seq=18 is not divisible by 2\*cp = 4"),
    (dict(seq=15), r"seq=15 \(15 tokens per CP rank\) is not divisible by tp=2"),
    (dict(precision="fp8"), r"precision='fp8' must be one of \('fp32', 'bf16', 'fp16'\)"),
    (dict(ep=2), r"ep=2: expert parallelism is not implemented"),
    (dict(pp=2, tp=1, cp=2), r"pp=2 with cp=2"),
    (dict(pp=2, model="llama-tiny"), r"pp=2 runs model='tinylm' only"),
    (dict(world=5), r"world size 5 is not a multiple of tp\*pp\*cp"),
    (dict(model="gpt-7"), r"model='gpt-7' is neither a built-in"),
])
def test_bad_configs_fail_before_any_rank_starts(changes, error):
    with pytest.raises(ValueError, match=error):
        train(TrainConfig(**{"world": 4, "tp": 2, "seq": 16, "global_batch": 8,
                             "progress": False, **changes}))


def test_a_token_file_shorter_than_one_sample_is_refused(tmp_path):
    np.arange(16, dtype=np.uint16).tofile(tmp_path / "short.bin")
    with pytest.raises(ValueError, match=r"holds 16 tokens, fewer than one sample of seq \+ 1 "
                                         r"= 17"):
        train(TrainConfig(world=2, tp=2, seq=16, data=str(tmp_path / "short.bin")))


def test_the_command_line_trains_and_reports(tmp_path):
    png = tmp_path / "loss.png"
    done = subprocess.run(
        [sys.executable, "-m", "parallelkit", "train", "--world", "4", "--tp", "2", "--steps",
         "3", "--global-batch", "4", "--seq", "16", "--model-arg", "hidden=16",
         "--model-arg", "layers=1", "--no-progress", "--plot", str(png)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 3 | final loss " in done.stdout and " tokens/s | MFU " in done.stdout, done.stdout
    assert "tp 2 x cp 1 x dp 2 x pp 1 (4 ranks, fp32)" in done.stdout
    assert png.stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "parallelkit", "train", "--world", "4", "--tp",
                          "2", "--global-batch", "3"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "global_batch=3 is not divisible" in bad.stderr
