"""Print the simulated timeline of a schedule (the text comes from simulate.format_timeline).

    python -m parallelkit.pipeline_parallel.timeline --schedule 1f1b --pp 4 --m 8
    python -m parallelkit.pipeline_parallel.timeline --schedule zb-h1 --pp 4 --m 8 --f 1 --b 1 --w 1
    python -m parallelkit.pipeline_parallel.timeline --schedule interleaved-1f1b --pp 2 --m 4 --v 2

One row per pipeline rank, one column per time unit: ``F3`` is the forward of micro-batch 3,
``B3.1`` the backward of micro-batch 3 on the rank's chunk 1, ``.`` an idle unit (waiting or
communicating). An action lasting several units repeats its label.
"""

from __future__ import annotations

import argparse

from parallelkit.pipeline_parallel.schedules import SCHEDULES, build_schedule
from parallelkit.pipeline_parallel.simulate import Costs, format_timeline, simulate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--m", type=int, default=8, help="micro-batches")
    parser.add_argument("--v", type=int, default=None,
                        help="chunks per rank (interleaved only; default 2 there, else 1)")
    parser.add_argument("--f", type=float, default=1.0, help="forward time of one chunk")
    parser.add_argument("--b", type=float, default=1.0, help="input-gradient backward time")
    parser.add_argument("--w", type=float, default=1.0,
                        help="weight-gradient time (a B not split from its W costs b + w)")
    parser.add_argument("--p2p", type=float, default=0.0, help="time of one message")
    parser.add_argument("--actions", action="store_true", help="also print every rank's actions")
    args = parser.parse_args(argv)
    v = args.v or (2 if args.schedule == "interleaved-1f1b" else 1)
    schedule = build_schedule(args.schedule, args.pp, args.m, v)
    if args.actions:
        print(schedule, end="\n\n")
    print(format_timeline(simulate(schedule, Costs(args.f, args.b, args.w, args.p2p))))


if __name__ == "__main__":
    main()
