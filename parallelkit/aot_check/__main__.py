"""``python -m parallelkit.aot_check [--json PATH] [--only REGEX] [--jobs N]``: see __init__."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import triton

from parallelkit.aot_check import SHARED_LIMIT, Case, Row, check, kernel_names


def main(argv: list[str] | None = None, cases: list[Case] | None = None) -> int:
    """The command line; ``cases`` replaces the built-in ones (tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m parallelkit.aot_check",
        description="Compile every Triton kernel for sm_90 at the launchers' own configurations "
                    "and fail on a compile error, a register spill or too much shared memory.")
    parser.add_argument("--json", metavar="PATH", help="also write every launch's row as JSON")
    parser.add_argument("--only", metavar="REGEX",
                        help="only the cases whose name matches, e.g. 'attention/D128'")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="compiler processes (default: the CPUs, at most 8)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = check(cases, only=args.only, jobs=args.jobs)
    seconds = time.perf_counter() - start
    if not rows:
        print(f"no case matches --only {args.only!r}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print()
    print(format_summary(rows))
    failures = [row for row in rows if row.problems()]
    # The whole check must reach every kernel: one without a case would pass unchecked.
    unchecked = set() if cases or args.only else kernel_names() - {row.kernel for row in rows}
    binaries = len({row.launch.compile_key() for row in rows if row.launch is not None})
    print(f"\n{len(rows)} launches, {binaries} distinct binaries compiled for sm_90 in "
          f"{seconds:.0f} s (Triton {triton.__version__}, {args.jobs} jobs)")
    for row in failures:
        launch = " ".join(filter(None, (row.kernel, f"[{row.case}]", row.config())))
        print(f"FAIL {launch}: {'; '.join(row.problems())}")
    for kernel in sorted(unchecked):
        print(f"FAIL {kernel}: no case launches it; add one to parallelkit/aot_check/cases.py")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"target": "cuda sm_90", "triton": triton.__version__,
                       "shared_limit_bytes": SHARED_LIMIT, "seconds": round(seconds, 1),
                       "failures": len(failures), "unchecked_kernels": sorted(unchecked),
                       "launches": [row.to_json() for row in rows]},
                      file, indent=1)
    if failures or unchecked:
        print(f"{len(failures)} launches fail the check, {len(unchecked)} kernels unchecked")
        return 1
    print("OK: no compile error, no spill, shared memory within sm_90's limit")
    return 0


def _kernel_name(row: Row) -> str:
    return row.kernel.removeprefix("_").removesuffix("_kernel")


def format_table(rows: list[Row]) -> str:
    """One line per launch: kernel, case (op/dtype/shape), constexprs, warps, stages, grid,
    registers, spilled bytes per thread, shared memory."""
    header = ("kernel", "case", "constexprs", "warps", "stages", "grid", "regs", "spill B",
              "smem B", "")
    lines = [header]
    for row in rows:
        launch = row.launch
        lines.append((_kernel_name(row), row.case, row.config(),
                      *((str(launch.options["num_warps"]), str(launch.options["num_stages"]),
                         "x".join(map(str, launch.grid))) if launch else ("", "", "")),
                      str(row.compiled.registers), str(row.compiled.spill_bytes),
                      str(row.compiled.shared_bytes), "FAIL" if row.problems() else "ok"))
    return _aligned(lines)


def format_summary(rows: list[Row]) -> str:
    """Per kernel: launches, distinct binaries, the most registers, spilled bytes and shared
    memory over them, failures."""
    lines = [("kernel", "launches", "binaries", "max regs", "max spill B", "max smem B",
              "failures")]
    for kernel in dict.fromkeys(_kernel_name(row) for row in rows):
        mine = [row for row in rows if _kernel_name(row) == kernel]
        binaries = {row.launch.compile_key() for row in mine if row.launch is not None}
        lines.append((kernel, str(len(mine)), str(len(binaries)),
                      str(max(row.compiled.registers for row in mine)),
                      str(max(row.compiled.spill_bytes for row in mine)),
                      str(max(row.compiled.shared_bytes for row in mine)),
                      str(sum(bool(row.problems()) for row in mine))))
    return _aligned(lines)


def _aligned(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in lines)


if __name__ == "__main__":
    sys.exit(main())
