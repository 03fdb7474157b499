"""One command on a machine with one GPU and its own torch (``make gpu-check OUT=path.tgz``): build
the CUDA extension, run the GPU tests and the benchmarks' GPU configuration, and pack every step's
log, ``summary.json`` and every JSON/PNG the benchmarks write into ONE .tgz (a lent GPU machine
returns at most 8 files). Nothing is downloaded: it runs on the machine's own python and torch.

Steps, each cut off at its own budget and at what is left of the whole (480 s by default, the
build included, so that a second try fits a 15-minute lease). The tgz is written whatever happens:
a failed or timed-out step leaves its log and whatever it wrote, and the later steps still run.

    build        pip install --no-build-isolation --no-deps -e .  (the CUDA kernels, 200 s)
    info         python -m parallelkit info  (what the build contains, 30 s)
    imports      every module of parallelkit and benchmarks  (an API this torch lacks, 60 s)
    gpu-ranks    pytest -m "gpu and forks": 2 processes share the one GPU, joined by gloo on CUDA
                 tensors (NCCL refuses two ranks on one GPU)  (90 s)
    gpu-kernels  pytest -m "gpu and not forks": the compiled Triton kernels in pytest's processes,
                 6 of them where pytest-xdist is installed  (150 s)
    benchmarks   python -m benchmarks --gpu  (tables, JSON and PNG; what is left)

The two pytest steps are separate processes, so a kernel test that breaks the CUDA context cannot
take the multi-rank tests with it (and tests/conftest.py orders them safely within one run too).
``--dry-run`` runs the same steps on CPU with small budgets to prove this script (CI does): no
build, the GPU tests collected and skipped, the two GPU benchmarks at their quick sizes; the
summary says what was left out and why. Exit code 0 when every step that ran succeeded.

    python -m benchmarks.gpu_check --out PATH.tgz [--budget-s 480] [--skip-build] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks._harness import RESULTS, device_slug, machine_description

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 480.0
PACKING_S = 10.0  # kept back from the steps: summary.json and the tgz
MIN_STEP_S = 5.0  # a step with less time left than this is not started
MULTI_RANK = ("multi-rank GPU tests: 2 processes share the one GPU, joined by gloo on CUDA "
              "tensors (NCCL refuses two ranks on one GPU)")
PYTEST_TOTALS = re.compile(r"\d+ (?:passed|failed|skipped|errors?|deselected|xfailed|xpassed)"
                           r"\b.* in [\d.]+s")


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    budget_s: float
    note: str = ""  # what the step covers; in a dry run, what it leaves out
    skip: str = ""  # not run, and why


def plan(results: Path, *, dry_run: bool, skip_build: bool) -> list[Step]:
    """The steps, in order; ``results`` is where the benchmarks write."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider"]
    no_cuda = "dry run: no CUDA here, so every test is collected and skipped"
    if dry_run:
        build_skip = ("dry run: the extension as installed (make cuda-check and make "
                      "compat-check compile the CUDA build)")
    else:
        build_skip = "--skip-build: uses the extension as installed" if skip_build else ""
    bench = ([py, "-m", "benchmarks", "--quick", "norms", "cross_entropy"] if dry_run
             else [py, "-m", "benchmarks", "--gpu"])
    # Triton's compiles (one per kernel specialization, on first call) dominate the single-process
    # GPU tests: where the machine has pytest-xdist, 6 processes compile side by side.
    xdist = [] if dry_run or not importlib.util.find_spec("xdist") else ["-p", "xdist", "-n", "6"]
    return [
        Step("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
             200, "the extension with the CUDA kernels of this GPU", build_skip),
        Step("info", [py, "-m", "parallelkit", "info"], 60 if dry_run else 30),
        Step("imports", [py, "-m", "benchmarks.gpu_check", "--import-all"], 60),
        Step("gpu-ranks", pytest + ["-m", "gpu and forks"], 120 if dry_run else 90,
             no_cuda if dry_run else MULTI_RANK),
        Step("gpu-kernels", pytest + xdist + ["-m", "gpu and not forks"], 120 if dry_run else 150,
             no_cuda if dry_run else "compiled Triton kernels against float64 references"),
        Step("benchmarks", bench + ["--out", str(results)], 240 if dry_run else BUDGET_S,
             "dry run: norms and cross_entropy at quick sizes on CPU instead of the GPU "
             "configuration" if dry_run else "GPU sizes first, then the CPU ones at quick sizes"),
    ]


def step_env(dry_run: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # the image's pytest plugins: none is needed
           "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",  # no network there
           "MAX_JOBS": str(os.cpu_count() or 1)}
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", PARALLELKIT_BUILD_CUDA="0")
    else:
        env["PARALLELKIT_BUILD_CUDA"] = "1"
    return env


def run_step(command: list[str], log: Path, timeout: float, env: dict) -> tuple[int, bool]:
    """Run ``command`` in the repository, its output to the console and ``log``; (rc, timed out).
    The step's whole process group (forked ranks, compile workers) ends with it."""
    with log.open("w") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace",
                                   start_new_session=True)

        def pump():
            for line in process.stdout:
                sys.stdout.write(line)
                sink.write(line)

        copier = threading.Thread(target=pump, daemon=True)
        copier.start()
        timed_out = False
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also when this script itself is stopped: the step goes with it
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = process.wait()
            copier.join(10)
        if timed_out:
            sink.write(f"\n[gpu_check] stopped after {timeout:.0f} s (its budget)\n")
        return rc, timed_out


def detail(step: Step, log: Path, results: Path) -> str:
    """One line on what the step did: the build's CUDA facts, pytest's totals, the benchmark
    files written, else the log's last line."""
    if step.name == "benchmarks":
        written = [p.suffix for p in results.glob("*") if p.suffix in (".json", ".png")]
        return f"wrote {written.count('.json')} JSON, {written.count('.png')} PNG"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    facts = ["=".join(part.strip() for part in line.split(":", 1)) for line in lines
             if line.startswith("cuda_")]
    if step.name == "info" and facts:
        return ", ".join(facts)
    totals = [found for line in lines for found in PYTEST_TOTALS.findall(line)]
    return totals[-1] if totals else lines[-1][:100] if lines else ""


def run_all(steps: list[Step], stage: Path, results: Path, budget_s: float, env: dict):
    """Run ``steps`` within ``budget_s``, yielding one record per step as it ends."""
    start = time.monotonic()
    for step in steps:
        record = {"step": step.name, "command": step.command, "budget_s": step.budget_s,
                  "note": step.note, "log": f"{step.name}.log"}
        left = budget_s - PACKING_S - (time.monotonic() - start)
        if step.skip or left < MIN_STEP_S:
            reason = step.skip or f"not run: {max(left, 0):.0f} s of the {budget_s:.0f} s left"
            record.update(status="skipped" if step.skip else "not run", rc=None, seconds=0.0,
                          detail=reason, log=None)
            print(f"\n[gpu_check] {step.name}: {reason}")
            yield record
            continue
        timeout = min(step.budget_s, left)
        print(f"\n[gpu_check] {step.name}: {' '.join(step.command)} (at most {timeout:.0f} s)",
              flush=True)
        began = time.monotonic()
        rc, timed_out = run_step(step.command, stage / record["log"], timeout, env)
        status = "TIMEOUT" if timed_out else "ok" if rc == 0 else "FAILED"
        record.update(status=status, rc=rc, timed_out=timed_out,
                      seconds=round(time.monotonic() - began, 1),
                      detail=detail(step, stage / record["log"], results))
        yield record


def pack(stage: Path, out: Path) -> list[str]:
    """``stage`` as one folder in the .tgz ``out`` (written beside, then moved into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:gz") as tgz:
        tgz.add(stage, arcname=stage.name)
        names = tgz.getnames()
    partial.replace(out)
    return names


def format_summary(summary: dict) -> str:
    """The one-screen summary printed at the end."""
    m = summary["machine"]
    mode = "DRY RUN on CPU" if summary["dry_run"] else m["gpu"] or "no GPU"
    lines = [f"gpu_check: {mode}; torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, "
             f"Python {m['python']}",
             f"{'step':<12} {'status':<8} {'seconds':>7} {'budget':>6}  detail"]
    ran = any(r["status"] != "skipped" for r in summary["steps"])
    verdict = "all steps ok" if summary["ok"] else "SOME STEPS FAILED" if ran else "NOTHING RAN"
    for r in summary["steps"]:
        lines.append(f"{r['step']:<12} {r['status']:<8} {r['seconds']:>7.0f} "
                     f"{r['budget_s']:>6.0f}  {r['detail']}")
        if r["note"] and r["status"] != "skipped":
            lines.append(f"{'':<36}({r['note']})")
    lines.append(f"{summary['total_seconds']:.0f} s of {summary['budget_s']:.0f} s; "
                 f"{verdict}; "
                 f"{summary['files']} files (<step>.log, summary.json, results) in "
                 f"{summary['out']}")
    return "\n".join(lines)


def resolve_out(out: Path | None, folder: str) -> Path:
    """The .tgz path: ``out`` itself, ``out/<folder>.tgz`` for a folder, or under results/."""
    if out is None:
        return RESULTS / f"{folder}.tgz"
    return (out / f"{folder}.tgz" if out.is_dir() else out).resolve()


def import_all() -> int:
    """Import every module of parallelkit (its kernels too) and of benchmarks: a torch, Triton or
    transformers API that this machine's versions lack at import time shows here, by module."""
    packages = ["parallelkit", "parallelkit.kernels", "benchmarks"]
    names, failed = [], {}
    for package in packages:
        module = importlib.import_module(package)
        found = pkgutil.walk_packages(module.__path__, f"{package}.",
                                      onerror=lambda name: failed.setdefault(
                                          name, traceback.format_exc()))
        names += [package] + [m.name for m in found if not m.name.endswith(".__main__")]
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except Exception:
            failed[name] = traceback.format_exc()
    for name, error in failed.items():
        print(f"--- {name} ---\n{error}")
    print(f"imported {len(set(names)) - len(failed)} of {len(set(names))} modules of "
          f"{', '.join(packages)}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # so that the tgz is still written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        help="the .tgz to write (a folder: <folder>/gpu-<device>-<date>.tgz; "
                             "default benchmarks/results/gpu-<device>-<date>.tgz)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="the whole run's wall-clock limit, build and packing included")
    parser.add_argument("--skip-build", action="store_true", help="use the extension as installed")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on CPU with small budgets, to prove this script")
    parser.add_argument("--import-all", action="store_true",
                        help="only import every module (the imports step) and exit")
    args = parser.parse_args(argv)
    if args.import_all:
        return import_all()
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU mode, also on a machine with a GPU
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    start = time.monotonic()
    machine = machine_description()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = f"gpu-{'dry-run-' if args.dry_run else ''}{device_slug(machine)}-{stamp}"
    out = resolve_out(args.out, folder)
    stage = Path(tempfile.mkdtemp(prefix="gpu-check-")) / folder
    stage.mkdir()
    steps = plan(stage, dry_run=args.dry_run, skip_build=args.skip_build)
    if machine["gpu"] is None and not args.dry_run:
        steps = [Step(s.name, s.command, s.budget_s, s.note,
                      "torch sees no CUDA device here (--dry-run tries this script on CPU)")
                 for s in steps]
    print(f"gpu_check: {'dry run on CPU' if args.dry_run else machine['gpu'] or 'no GPU'}, "
          f"torch {machine['torch']}; "
          f"{args.budget_s:.0f} s in all; everything goes to {out}", flush=True)
    records, error = [], None
    try:
        for record in run_all(steps, stage, stage, args.budget_s - (time.monotonic() - start),
                              step_env(args.dry_run)):
            records.append(record)
    except BaseException as stop:  # stopped from outside: keep what the steps wrote
        error = f"gpu_check itself was stopped ({stop!r})"
        raise
    finally:
        for i, step in enumerate(steps[len(records):]):  # the step it was stopped in, then the rest
            records.append({"step": step.name, "command": step.command, "budget_s": step.budget_s,
                            "note": step.note, "status": "not run" if i else "STOPPED",
                            "rc": None, "seconds": 0.0, "detail": error,
                            "log": None if i else f"{step.name}.log"})
        ran = [r for r in records if r["status"] != "skipped"]
        summary = {"machine": machine, "dry_run": args.dry_run, "budget_s": args.budget_s,
                   "multi_rank": MULTI_RANK, "steps": records, "out": str(out),
                   "ok": bool(ran) and error is None and all(r["status"] == "ok" for r in ran),
                   "total_seconds": round(time.monotonic() - start, 1),
                   "files": sum(p.is_file() for p in stage.rglob("*")) + 1}
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        pack(stage, out)
        shutil.rmtree(stage.parent, ignore_errors=True)
        print("\n" + format_summary(summary), flush=True)
    if machine["gpu"] is None and not args.dry_run:
        return 2
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
