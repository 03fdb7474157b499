"""The training demo in miniature: a few steps on 8 ranks track the single-process curve."""

from parallelkit.demos.train import DemoConfig, report, train_parallel, train_single
from parallelkit.testing import run_on_ranks


def test_demo_curves_agree():
    cfg = DemoConfig(steps=3, batch=4, seq=16, hidden=32, layers=1)
    results = run_on_ranks(train_parallel, 8, cfg, False, timeout=300)
    losses, paths = results[0]
    assert all(r[0] == losses for r in results)  # every rank reports the global loss
    single = train_single(cfg, progress=False)
    text, diff = report(cfg, losses, single, paths)
    assert diff < 1e-5, text
    assert "tp 2 x cp 2 x dp 2" in text
    # The fast path: sequence parallelism through the fused ring matmuls, no fallback.
    assert {"fused all_gather_matmul shared by the region", "fused matmul_reduce_scatter",
            "fused all_gather_matmul"} == set(paths), text


def test_pipeline_demo_curves_agree():
    from parallelkit.demos.train import train_pipeline

    cfg = DemoConfig(steps=2, batch=4, seq=16, hidden=32, layers=2, cp=1, pp=2)
    results = run_on_ranks(train_pipeline, 8, cfg, False, timeout=300)
    losses = results[0][0]
    assert all(r[0] == losses for r in results)
    text, diff = report(cfg, losses, train_single(cfg, progress=False))
    assert diff < 1e-5, text
    assert "tp 2 x pp 2 (1F1B) x dp 2" in text
