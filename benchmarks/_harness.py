"""What every benchmark shares: the machine's description, timing, the measured hardware
ceilings, a text table, the JSON record and a PNG plot.

A benchmark module ``bench_<name>.py`` exposes ``collect(argv) -> Report`` and ``QUICK`` (the
argv of small sizes; ``GPU``, where it has one, the argv of its GPU configuration), and its
``main(argv)`` is ``publish(collect(argv))``. The runner (``python -m benchmarks``) calls the same.
Rows may carry ``flops`` or ``bytes`` (per rank and per timed call, next to ``median_ms``), with
``device`` ("cpu" unless said) and, for flops, ``dtype``: ``publish`` then adds the achieved rate
and its share of the ceiling measured on that device (``%peak``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).parent / "results"
RESULTS_ENV = "PARALLELKIT_BENCH_RESULTS"  # where results go instead (the runner's --out)
PEAK_COLUMNS = [("achieved", ""), ("%peak", ".1f")]


@dataclass
class Report:
    """One benchmark's outcome and how to show it."""

    name: str
    rows: list[dict]
    columns: list[tuple[str, str]]  # (row key, format spec): the table, in order
    keys: list[str]  # the columns that say which size and variant a row is (the plot's labels)
    settings: dict
    notes: list[str] = field(default_factory=list)
    plot_value: str = "median_ms"  # what the plot's bars show


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or RESULTS)


def machine_description() -> dict:
    """Enough to tell two result files' machines apart (recorded with every result)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu_name(), "torch": torch.__version__,
            "triton": triton, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def gpu_name() -> str | None:
    """The first visible GPU's name, without creating a CUDA context in this process: a parent
    that has one can no longer fork the CUDA-using ranks of a LocalWorld."""
    if not torch.cuda.is_available():  # NVML-based, see benchmarks/__init__.py
        return None
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    index = ["-i", visible] if visible.isdigit() else []
    commands = [["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", *index],
                [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"]]
    for command in commands:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "unknown GPU"


def device_slug(machine: dict) -> str:
    return (machine["gpu"] or "cpu").lower().replace(" ", "-")


def summarize(seconds: list[float]) -> dict:
    """Median and interquartile spread, in milliseconds."""
    q1, median, q3 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else seconds * 3
    return {"median_ms": median * 1e3, "iqr_ms": (q3 - q1) * 1e3}


def time_op(fn, *, device: str | torch.device = "cpu", repeats: int = 10, warmup: int = 2,
            group: dist.ProcessGroup | None = None) -> list[float]:
    """Seconds per call of ``fn``, one entry per sample, after ``warmup`` calls.

    On one process: CUDA through ``triton.testing.do_bench`` (CUDA events, L2 flushed between
    calls, about 100 ms of calls); on CPU, calls under 10 ms through ``torch.utils.benchmark``'s
    ``Timer.timeit``, ``repeats`` blocks of about 10 ms of calls (a sample is a block's mean, so
    the spread is that of the means). Not its ``blocked_autorange``: it sizes blocks from its
    overhead, and on a loaded machine made one block of all the time given. Longer calls, and
    calls on a ``group`` of several ranks, are timed one by one with ``perf_counter``: for the
    first a timer's overhead is noise anyway and ``timeit`` would add two warm-up calls per
    sample; for the second a rank's time must include waiting for its peers after a barrier,
    which the library timers, made for one process, neither synchronize nor see.
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    ranks = group is not None and dist.get_world_size(group) > 1
    if cuda and not ranks:
        return [ms / 1e3 for ms in _do_bench_all(fn)]
    if not ranks and not cuda:
        start = time.perf_counter()
        fn()
        estimate = time.perf_counter() - start
        if estimate < 0.01:
            from torch.utils import benchmark

            timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            number = max(1, round(0.01 / max(estimate, 1e-7)))
            return [timer.timeit(number).mean for _ in range(repeats)]
    seconds = []
    for _ in range(repeats):
        if ranks:
            dist.barrier(group)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_alternating(steps: dict, *, repeats: int, warmup: int,
                     group: dist.ProcessGroup | None = None) -> dict[str, list[float]]:
    """Seconds per call of each of ``steps`` (name -> function), the functions taking turns call
    by call, so that ours and a peer see the same load on a shared machine; ``warmup`` rounds
    untimed. With a ``group``, every call starts after a barrier: a rank's time then includes
    waiting for its peers, and :func:`slowest_per_step` of the ranks' lists is the step time."""
    seconds = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, fn in steps.items():
            if group is not None:
                dist.barrier(group)
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def slowest_per_step(per_rank: list[list[float]]) -> list[float]:
    """Per step, the slowest rank's seconds: a step that the ranks began together after a
    barrier ends when its last rank does."""
    return [max(step) for step in zip(*per_rank)]


def paired_ratio(ours: list[float], peer: list[float]) -> float:
    """``ours/peer``: the median over steps of our step time over the peer's step next to it
    (paired, so that a busy moment of the machine slows both sides of a ratio)."""
    return statistics.median(a / b for a, b in zip(ours, peer))


def _do_bench_all(fn) -> list[float]:
    """Every timed call's milliseconds; older Triton lacks return_mode="all": then CUDA events."""
    from triton.testing import do_bench

    try:
        return list(do_bench(fn, warmup=25, rep=100, return_mode="all"))
    except (AssertionError, TypeError):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(20)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def measure_ceilings(device: str = "cpu", gemm_n: int | None = None,
                     copy_mib: int | None = None, repeats: int = 5) -> dict:
    """This process's GEMM rate (TFLOP/s per dtype) and copy bandwidth (GB/s, bytes read plus
    written) on ``device``: the limits the benchmarks' rows are measured against. On the CPU with
    this process's threads (a benchmark rank has one); on a GPU fp32 without TF32, and bf16."""
    cuda = device == "cuda"
    n = gemm_n or (8192 if cuda else 1024)
    gemm = {}
    for dtype in (torch.float32, torch.bfloat16) if cuda else (torch.float32,):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        seconds = statistics.median(time_op(lambda: torch.mm(a, b, out=out), device=device,
                                            repeats=repeats, warmup=1))
        gemm[str(dtype).removeprefix("torch.")] = 2 * n**3 / seconds / 1e12
    numel = (copy_mib or (1024 if cuda else 128)) * 2**20 // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    seconds = statistics.median(time_op(lambda: dst.copy_(src), device=device,
                                        repeats=repeats, warmup=1))
    return {"device": device, "threads": None if cuda else torch.get_num_threads(),
            "gemm_n": n, "gemm_TFLOPs": gemm, "copy_GBps": 2 * numel * 4 / seconds / 1e9}


def measure_all_ceilings() -> dict:
    """The ceilings of every device here, measured in a fresh one-thread rank like the
    benchmarks' (and so that CUDA is first touched there, not in this forking parent)."""
    from parallelkit.launch import LocalWorld

    with LocalWorld(1) as world:
        return world.run(_ceilings_on_rank, timeout=300)[0]


def _ceilings_on_rank() -> dict:
    found = {"cpu": measure_ceilings("cpu")}
    if torch.cuda.is_available():
        found["cuda"] = measure_ceilings("cuda")
    return found


def describe_ceilings(ceilings: dict) -> str:
    parts = []
    for device, c in ceilings.items():
        gemm = ", ".join(f"{dtype} {rate:.3g} TFLOP/s" for dtype, rate in c["gemm_TFLOPs"].items())
        threads = c["threads"] and f" ({c['threads']} thread{'' if c['threads'] == 1 else 's'})"
        parts.append(f"{device}{threads or ''}: GEMM {gemm}; copy {c['copy_GBps']:.3g} GB/s")
    return "measured ceilings: " + " | ".join(parts)


def add_peak_columns(rows: list[dict], ceilings: dict) -> bool:
    """Fill ``achieved`` and ``%peak`` in the rows that carry flops or bytes; whether any did."""
    found = False
    for row in rows:
        ceiling = ceilings.get(str(row.get("device", "cpu")).split(":")[0])
        seconds = (row.get("median_ms") or 0) / 1e3
        if ceiling is None or not seconds:
            continue
        if row.get("flops"):
            rate = row["flops"] / seconds / 1e12
            peak = ceiling["gemm_TFLOPs"].get(row.get("dtype", "float32"))
            row["achieved"] = f"{rate:.3g} TFLOP/s" if rate >= 1 else f"{rate * 1e3:.3g} GFLOP/s"
        elif row.get("bytes"):
            rate = row["bytes"] / seconds / 1e9
            peak = ceiling["copy_GBps"]
            row["achieved"] = f"{rate:.3g} GB/s"
        else:
            continue
        if peak:
            row["%peak"] = 100 * rate / peak
        found = True
    return found


def _cell(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, format spec) pairs; the key is also the header; absent values show '-'."""
    cells = [[_cell(row.get(key), spec) for key, spec in columns] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, (key, _) in enumerate(columns)]
    lines = ["  ".join(key.rjust(w) for (key, _), w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], settings: dict, *, machine: dict | None = None,
                  ceilings: dict | None = None, columns=None, keys=None, profile: str = "default",
                  out_dir: Path | None = None) -> Path:
    """``<out_dir>/<name>-<device>[-<profile>].json`` with the machine, the ceilings, the
    settings and every row (``out_dir``: the runner's --out, else ``results/``)."""
    machine = machine or machine_description()
    device = device_slug(machine)
    out_dir = Path(out_dir or results_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if profile == "default" else f"-{profile}"
    path = out_dir / f"{name}-{device}{suffix}.json"
    record = {"benchmark": name, "device": device, "profile": profile, "machine": machine,
              "ceilings": ceilings, "settings": settings, "columns": columns, "keys": keys,
              "rows": rows}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def plot(rows: list[dict], keys: list[str], value: str, path: Path, title: str) -> Path:
    """One horizontal bar per row (labelled by the keys that vary) of ``value``, with the IQR's
    width as error bar when it is a median; beside it ``%peak`` where rows have it. Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying = [k for k in keys if len({str(r.get(k)) for r in rows}) > 1] or keys[:1]
    labels = [" ".join(f"{k}={r.get(k)}" for k in varying) for r in rows]
    values = [r.get(value) or 0.0 for r in rows]
    # the bar spans the interquartile range's width, centred on the median
    errors = [(r.get("iqr_ms") or 0.0) / 2 for r in rows] if value == "median_ms" else None
    peaks = [r.get("%peak") for r in rows]
    panels = [(value, values, errors)] + ([("% of measured peak", [p or 0.0 for p in peaks], None)]
                                          if any(p is not None for p in peaks) else [])
    fig, axes = plt.subplots(1, len(panels), squeeze=False, sharey=True,
                             figsize=(5 + 4 * len(panels), 1.2 + 0.3 * len(rows)))
    for ax, (xlabel, xs, err) in zip(axes[0], panels):
        ax.barh(range(len(rows)), xs, xerr=err, color="tab:blue", alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def publish(report: Report, *, ceilings: dict | None = None, machine: dict | None = None,
            profile: str = "default", out_dir: Path | None = None, draw: bool = True,
            echo=print) -> Path:
    """Print the table (with %peak) and notes, write the JSON and, with ``draw``, the PNG."""
    ceilings = ceilings if ceilings is not None else measure_all_ceilings()
    machine = machine or machine_description()
    columns = list(report.columns)
    if add_peak_columns(report.rows, ceilings):
        columns += PEAK_COLUMNS
    echo(format_table(report.rows, columns))
    for note in report.notes:
        echo(f"note: {note}")
    settings = {**report.settings, "notes": report.notes} if report.notes else report.settings
    path = write_results(report.name, report.rows, settings, machine=machine, ceilings=ceilings,
                         columns=columns, keys=report.keys, profile=profile, out_dir=out_dir)
    echo(f"wrote {path}")
    if draw and report.rows:
        where = machine["gpu"] or machine["cpu"]
        title = f"{report.name} ({profile}), {where}, {machine['date'][:10]}"
        png = plot(report.rows, report.keys, report.plot_value, path.with_suffix(".png"), title)
        echo(f"wrote {png}")
    return path
