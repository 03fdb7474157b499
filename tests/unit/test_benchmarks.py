"""The benchmark harness's pieces, fast: ceilings, timing, the table, the JSON record, the plot,
the README's tables and the runner's discovery. No benchmark runs here."""

import json
import math

import pytest
import torch

from benchmarks import __main__ as runner
from benchmarks import _readme
from benchmarks._harness import (PEAK_COLUMNS, Report, add_peak_columns, format_table,
                                 measure_ceilings, paired_ratio, plot, publish, slowest_per_step,
                                 time_alternating, time_op, write_results)

CEILINGS = {"cpu": {"device": "cpu", "threads": 1, "gemm_n": 64,
                    "gemm_TFLOPs": {"float32": 0.1}, "copy_GBps": 10.0}}
MACHINE = {"cpu": "Test CPU", "cores": 2, "gpu": None, "torch": "2.x", "triton": "3.x",
           "cuda": None, "python": "3.11", "date": "2026-01-02T03:04:05+00:00"}


def test_measured_ceilings_are_positive_numbers():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a benchmark rank; several threads crawl on a loaded machine
    try:
        found = measure_ceilings("cpu", gemm_n=128, copy_mib=4, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert found["device"] == "cpu" and found["threads"] == 1
    assert found["gemm_TFLOPs"]["float32"] > 0 and found["copy_GBps"] > 0


def test_time_op_returns_one_positive_sample_per_block():
    calls = []
    seconds = time_op(lambda: calls.append(1), repeats=1, warmup=2)
    assert seconds and all(s > 0 for s in seconds) and len(calls) > 2


def test_time_alternating_takes_turns_and_times_only_after_warmup():
    calls = []
    seconds = time_alternating({"ours": lambda: calls.append("ours"),
                                "peer": lambda: calls.append("peer")}, repeats=3, warmup=2)
    assert calls == ["ours", "peer"] * 5
    assert {name: len(s) for name, s in seconds.items()} == {"ours": 3, "peer": 3}
    assert all(s >= 0 for samples in seconds.values() for s in samples)


def test_a_step_lasts_as_long_as_its_slowest_rank_and_ratios_pair_steps():
    assert slowest_per_step([[1.0, 5.0, 2.0], [3.0, 1.0, 2.5]]) == [3.0, 5.0, 2.5]
    # each of our steps over the peer's step next to it, then the median: a slow moment of the
    # machine (the middle step) slows both sides and cancels out
    assert paired_ratio([1.0, 10.0, 2.0], [2.0, 20.0, 2.0]) == 0.5


def test_table_aligns_columns_and_shows_absent_values_as_a_dash():
    rows = [{"size": 8, "variant": "fused", "median_ms": 1.234},
            {"size": 16, "variant": "unfused", "median_ms": float("nan")}]
    lines = format_table(rows, [("size", "d"), ("variant", ""), ("median_ms", ".1f"),
                                ("%peak", ".1f")]).splitlines()
    assert lines[0].split() == ["size", "variant", "median_ms", "%peak"]
    assert lines[1].split() == ["8", "fused", "1.2", "-"]
    assert lines[2].split() == ["16", "unfused", "-", "-"]
    assert len({len(line) for line in lines}) == 1


def test_peak_share_from_flops_or_bytes_on_the_rows_device():
    rows = [{"median_ms": 10.0, "flops": 5e8},  # 50 GFLOP/s of 100
            {"median_ms": 10.0, "bytes": 2.5e7, "device": "cpu"},  # 2.5 GB/s of 10
            {"median_ms": 10.0, "bytes": 1e9, "device": "cuda"},  # no cuda ceiling here
            {"median_ms": 10.0}]
    assert add_peak_columns(rows, CEILINGS)
    assert math.isclose(rows[0]["%peak"], 50.0) and rows[0]["achieved"] == "50 GFLOP/s"
    assert math.isclose(rows[1]["%peak"], 25.0) and rows[1]["achieved"] == "2.5 GB/s"
    assert "%peak" not in rows[2] and "%peak" not in rows[3]


def test_json_record_has_the_machine_ceilings_and_rows(tmp_path):
    path = write_results("demo", [{"size": 1, "median_ms": 2.0}], {"repeats": 3},
                         machine=MACHINE, ceilings=CEILINGS, profile="quick", out_dir=tmp_path)
    assert path.name == "demo-cpu-quick.json"
    record = json.loads(path.read_text())
    assert {"cpu", "cores", "gpu", "torch", "triton", "cuda", "date"} <= set(record["machine"])
    assert record["ceilings"] == CEILINGS and record["rows"] == [{"size": 1, "median_ms": 2.0}]
    assert record["profile"] == "quick" and record["device"] == "cpu"


def test_plot_writes_a_png(tmp_path):
    rows = [{"tp": 1, "median_ms": 3.0, "iqr_ms": 0.5, "%peak": 40.0},
            {"tp": 2, "median_ms": 2.0, "iqr_ms": 0.2, "%peak": 30.0}]
    path = plot(rows, ["tp"], "median_ms", tmp_path / "demo.png", "demo")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_publish_prints_the_table_with_peak_and_writes_json_and_png(tmp_path):
    report = Report("demo", [{"size": 4, "median_ms": 10.0, "iqr_ms": 1.0, "flops": 1e9}],
                    [("size", "d"), ("median_ms", ".1f")], ["size"], {"repeats": 3}, ["a note"])
    printed = []
    path = publish(report, ceilings=CEILINGS, machine=MACHINE, out_dir=tmp_path,
                   echo=printed.append)
    assert "%peak" in printed[0] and "100.0" in printed[0] and "note: a note" in printed
    assert json.loads(path.read_text())["columns"] == [["size", "d"], ["median_ms", ".1f"],
                                                       *map(list, PEAK_COLUMNS)]
    assert path.with_suffix(".png").exists()


def _record(tmp_path, name, profile, date, value):
    machine = {**MACHINE, "date": date}
    return write_results(name, [{"size": 8, "median_ms": value}], {"seq": 4, "chunks": [1, 2]},
                         machine=machine, ceilings=CEILINGS, columns=[("size", "d"),
                                                                      ("median_ms", ".2f")],
                         keys=["size"], profile=profile, out_dir=tmp_path / "results")


def test_readme_tables_come_from_the_json_and_prefer_default_sizes(tmp_path):
    _record(tmp_path, "overlap", "default", "2026-01-01T00:00:00+00:00", 1.5)
    _record(tmp_path, "overlap", "quick", "2026-02-01T00:00:00+00:00", 9.0)  # newer, but quick
    _record(tmp_path, "norms", "quick", "2026-02-01T00:00:00+00:00", 0.25)
    readme = tmp_path / "README.md"
    readme.write_text(f"# prose kept\n\n{_readme.BEGIN}\nstale\n{_readme.END}\n\nmore prose\n")
    _readme.update_readme(readme, tmp_path / "results")
    text = readme.read_text()
    assert text.startswith("# prose kept") and text.rstrip().endswith("more prose")
    assert "stale" not in text and "9.00" not in text
    assert "### overlap · cpu · default sizes" in text and "| 8 | 1.50 |" in text
    assert "### norms · cpu · quick sizes" in text and "| 8 | 0.25 |" in text
    assert "Test CPU, 2 cores" in text and "2026-01-01" in text and "chunks=1 2" in text
    assert "`results/overlap-cpu.json`" in text
    _readme.update_readme(readme, tmp_path / "results")
    assert readme.read_text() == text  # regenerating changes nothing


def test_readme_tables_of_older_records_show_their_scalar_fields(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old-cpu.json").write_text(json.dumps(
        {"benchmark": "old", "machine": MACHINE, "settings": {},
         "rows": [{"tp": 2, "ratio": 1.23456, "lists": [1, 2]}]}))
    text = _readme.render_tables(tmp_path / "results", tmp_path)
    assert "| tp | ratio |" in text and "| 2 | 1.23 |" in text


def test_the_runner_finds_the_benchmarks_and_their_hooks():
    names = runner.discover()
    assert {"tp_layers", "overlap", "norms", "cross_entropy", "context_parallel",
            "parallelize"} <= set(names)
    import benchmarks.bench_overlap as overlap

    assert runner.benchmark_argv(overlap, "quick") == overlap.QUICK
    assert runner.benchmark_argv(overlap, "gpu") == overlap.QUICK  # no GPU argv of its own
    assert runner.benchmark_argv(overlap, "default") == []
    with pytest.raises(SystemExit):
        runner.main(["no_such_benchmark"])
