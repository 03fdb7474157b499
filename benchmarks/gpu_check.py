"""One command on a machine with one GPU and a preinstalled torch (``make gpu-check``): build the
CUDA extension, run the GPU tests, run the benchmarks in their GPU configuration, and keep every
log and result in one folder, ``benchmarks/results/gpu-<device>-<date>/``.

Steps, each logged to ``<step>.log`` in that folder and cut off at its share of one overall budget
(570 s by default, so that the whole stays under 10 minutes):

    build       pip install --no-build-isolation --no-deps -e .  (CUDA kernels for this GPU)
    info        python -m parallelkit info                       (what the build contains)
    tests       pytest -m gpu: single-process kernel tests, and multi-rank tests in which two
                processes share the one GPU through gloo on CUDA tensors (NCCL refuses two
                ranks on one GPU)
    benchmarks  python -m benchmarks --gpu --out <folder>        (tables, JSON and PNG)

``summary.json`` records each step's exit code and time with the machine's description. The
exit code is 1 when any step failed.

    python -m benchmarks.gpu_check [--out DIR] [--budget-s 570] [--skip-build] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks._harness import RESULTS, device_slug, machine_description

REPO = Path(__file__).resolve().parent.parent
MULTI_RANK = ("multi-rank GPU tests: 2 processes share the one GPU, joined by gloo on CUDA "
              "tensors (NCCL refuses two ranks on one GPU)")


def steps(out: Path, quick: bool, skip_build: bool) -> list[tuple[str, list[str], float]]:
    """(name, command, the most seconds it may take); the benchmarks get whatever is left."""
    py = sys.executable
    build = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    return ([] if skip_build else [("build", build, 300)]) + [
        ("info", [py, "-m", "parallelkit", "info"], 60),
        ("tests", [py, "-m", "pytest", "-m", "gpu", "-v", "-rP", "-p", "no:cacheprovider"], 180),
        ("benchmarks", [py, "-m", "benchmarks", "--quick" if quick else "--gpu", "--out",
                        str(out)], float("inf")),
    ]


def run_step(command: list[str], log: Path, timeout: float, env: dict) -> tuple[int, bool]:
    """Run ``command`` in the repository, its output to the console and ``log``; (rc, timed out)."""
    with log.open("w") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def pump():
            for line in process.stdout:
                sys.stdout.write(line)
                sink.write(line)

        copier = threading.Thread(target=pump, daemon=True)
        copier.start()
        try:
            rc, timed_out = process.wait(timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the step's whole process group: ranks too
            rc, timed_out = process.wait(), True
        copier.join(10)
        if timed_out:
            sink.write(f"\n[gpu_check] stopped after {timeout:.0f} s\n")
        return rc, timed_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder (default results/gpu-<device>-<date>)")
    parser.add_argument("--budget-s", type=float, default=570.0)
    parser.add_argument("--skip-build", action="store_true", help="use the extension as installed")
    parser.add_argument("--quick", action="store_true",
                        help="benchmarks at their quick sizes instead of the GPU configuration")
    parser.add_argument("--allow-no-gpu", action="store_true",
                        help="run anyway without a GPU (to try this script; GPU tests skip)")
    args = parser.parse_args(argv)
    machine = machine_description()
    if machine["gpu"] is None and not args.allow_no_gpu:
        print("gpu_check: torch sees no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    out = (args.out or RESULTS / f"gpu-{device_slug(machine)}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0",
           "PARALLELKIT_BUILD_CUDA": "0" if machine["gpu"] is None else "1"}
    print(f"gpu_check: {machine['gpu']}, torch {machine['torch']}, CUDA {machine['cuda']}; "
          f"results in {out}\n{MULTI_RANK}")
    start, record = time.monotonic(), []
    for name, command, cap in steps(out, args.quick, args.skip_build):
        left = args.budget_s - (time.monotonic() - start)
        if left <= 0:
            record.append({"step": name, "rc": None, "seconds": 0.0, "note": "no time left"})
            continue
        print(f"\n[gpu_check] {name}: {' '.join(command)} (at most {min(cap, left):.0f} s)")
        began = time.monotonic()
        rc, timed_out = run_step(command, out / f"{name}.log", min(cap, left), env)
        record.append({"step": name, "command": command, "rc": rc, "timed_out": timed_out,
                       "seconds": round(time.monotonic() - began, 1), "log": f"{name}.log"})
    summary = {"machine": machine, "multi_rank": MULTI_RANK, "steps": record,
               "total_seconds": round(time.monotonic() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n[gpu_check] " + "  ".join(f"{r['step']}: {'ok' if r['rc'] == 0 else 'FAILED'} "
                                       f"({r['seconds']:.0f} s)" for r in record))
    print(f"[gpu_check] {summary['total_seconds']:.0f} s in all; logs and results in {out}")
    return 0 if all(r["rc"] == 0 for r in record) else 1


if __name__ == "__main__":
    sys.exit(main())
