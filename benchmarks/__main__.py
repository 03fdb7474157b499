"""The one runner of the microbenchmarks.

    python -m benchmarks                  every bench_*.py at its default sizes
    python -m benchmarks overlap norms    the named ones
    python -m benchmarks --quick          small sizes: every CPU benchmark in about 3 minutes
    python -m benchmarks --gpu            each one's GPU configuration (its GPU argv, else QUICK)
    python -m benchmarks --readme         only rewrite README.md's tables from results/**/*.json
    python -m benchmarks --list           the benchmarks found

It measures this machine's ceilings once (GEMM and copy, in a one-thread rank like the
benchmarks'), then per benchmark prints its table with the achieved share of them, writes
``<out>/<name>-<device>[-<profile>].json`` with the machine's description, and a PNG beside it.
A module without the ``collect``/``QUICK`` hook runs through its ``main([])`` at default sizes
and is skipped by --quick and --gpu.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from benchmarks import _readme
from benchmarks._harness import (RESULTS, RESULTS_ENV, describe_ceilings, machine_description,
                                 measure_all_ceilings, publish)


def discover() -> list[str]:
    """The names of the ``bench_<name>.py`` modules beside this file, sorted."""
    found = pkgutil.iter_modules([str(Path(__file__).parent)])
    return sorted(m.name.removeprefix("bench_") for m in found if m.name.startswith("bench_"))


def benchmark_argv(module, profile: str) -> list[str] | None:
    """The module's argv for ``profile``; None when it has no hook for it."""
    if not hasattr(module, "collect"):
        return [] if profile == "default" else None
    if profile == "quick":
        return list(module.QUICK)
    if profile == "gpu":
        return list(getattr(module, "GPU", module.QUICK))
    return []


def run_one(name: str, profile: str, ceilings: dict, machine: dict, out_dir: Path, draw: bool,
            echo) -> str:
    """Run one benchmark and publish it; returns a one-word outcome for the summary."""
    module = importlib.import_module(f"benchmarks.bench_{name}")
    argv = benchmark_argv(module, profile)
    if argv is None:
        echo(f"skipped: bench_{name} has no collect()/QUICK hook yet, so it has no {profile} "
             f"sizes; `python -m benchmarks {name}` runs it at its default sizes")
        return "skipped"
    if not hasattr(module, "collect"):
        module.main(argv)  # writes its own JSON, into out_dir through RESULTS_ENV
        return "ok (main)"
    start = time.perf_counter()
    report = module.collect(argv)
    report.settings = {**report.settings, "argv": argv, "wall_s": time.perf_counter() - start}
    publish(report, ceilings=ceilings, machine=machine, profile=profile, out_dir=out_dir,
            draw=draw, echo=echo)
    return "ok"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Run parallelkit's microbenchmarks.")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all); see --list")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes (what CI could run)")
    sizes.add_argument("--gpu", action="store_true", help="each benchmark's GPU configuration")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {RESULTS})")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--readme", action="store_true",
                        help="run nothing; rewrite README.md's tables from the JSON results")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    known = discover()
    if args.list:
        print("\n".join(known))
        return 0
    if args.readme:
        print(f"wrote {_readme.update_readme()}")
        return 0
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; found: {', '.join(known)}")
    names = args.names or known
    profile = "quick" if args.quick else "gpu" if args.gpu else "default"
    if profile == "gpu":  # the ones with GPU sizes first: a time limit then cuts CPU ones
        names = sorted(names, key=lambda n: not hasattr(
            importlib.import_module(f"benchmarks.bench_{n}"), "GPU"))
    out_dir = (args.out or RESULTS).resolve()
    os.environ[RESULTS_ENV] = str(out_dir)  # for modules that write their own JSON

    from tqdm import tqdm

    machine = machine_description()
    print(f"{machine['cpu']} ({machine['cores']} cores), GPU: {machine['gpu'] or 'none'}, "
          f"torch {machine['torch']}, triton {machine['triton']}, CUDA {machine['cuda']}")
    ceilings = measure_all_ceilings()
    print(describe_ceilings(ceilings))
    outcomes = {}
    bar = tqdm(names, desc="benchmarks", unit="bench", file=sys.stderr, disable=None)  # no TTY: off
    for name in bar:
        bar.set_postfix_str(name)
        tqdm.write(f"\n== {name} ({profile}) ==")
        start = time.perf_counter()
        try:
            outcome = run_one(name, profile, ceilings, machine, out_dir, not args.no_plot,
                              echo=tqdm.write)
        except Exception:  # one broken benchmark must not hide the others' results
            tqdm.write(traceback.format_exc())
            outcome = "FAILED"
        outcomes[name] = (outcome, time.perf_counter() - start)
    bar.close()
    print("\n" + "\n".join(f"{name:>18}  {outcome:<9}  {seconds:6.1f} s"
                           for name, (outcome, seconds) in outcomes.items()))
    print(f"results in {out_dir}")
    return 1 if any(outcome == "FAILED" for outcome, _ in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
