"""Command line: ``python -m parallelkit {layout,info}``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallelkit", description=__doc__)
    jobs = parser.add_subparsers(dest="job", required=True)

    layout = jobs.add_parser("layout", help="create the TP/PP/DP/CP groups on N ranks and prove "
                                            "each one with an all-reduce")
    layout.add_argument("--world", type=int, default=8,
                        help="local gloo processes to fork (ignored under torchrun)")
    layout.add_argument("--tp", type=int, default=1)
    layout.add_argument("--pp", type=int, default=1)
    layout.add_argument("--cp", type=int, default=1)
    layout.add_argument("--order", default="tp-cp-dp-pp",
                        help="axes from fastest- to slowest-varying rank (Megatron's order)")
    layout.add_argument("--dry-run", action="store_true",
                        help="print the rank map only; start no processes")

    demo = jobs.add_parser("demo", help="train a small Llama with TP x CP x DP on N ranks and "
                                        "compare its loss curve with one process")
    demo.add_argument("--world", type=int, default=8, help="local gloo processes to fork")
    demo.add_argument("--tp", type=int, default=2)
    demo.add_argument("--cp", type=int, default=2)
    demo.add_argument("--pp", type=int, default=1,
                      help="> 1: a GPT split into pipeline stages (1F1B) instead of CP")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--batch", type=int, default=8, help="sequences per step")
    demo.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    demo.add_argument("--hidden", type=int, default=64)
    demo.add_argument("--layers", type=int, default=2)
    demo.add_argument("--png", default="demo_loss.png", help="where to plot both curves ('' = no)")

    jobs.add_parser("info", help="what was compiled: torch, CUDA arches, Triton")

    args = parser.parse_args(argv)
    if args.job == "info":
        from parallelkit.about import format_build_info

        print(format_build_info())
        return 0
    if args.job == "demo":
        from parallelkit.demos.train import DemoConfig, run

        fields = ("world", "tp", "cp", "pp", "steps", "batch", "seq", "hidden", "layers")
        config = DemoConfig(**{name: getattr(args, name) for name in fields})
        return 0 if run(config, args.png or None) else 1
    from parallelkit.demos import layout as layout_demo
    from parallelkit.distributed.mpu import describe
    from parallelkit.distributed.rank_groups import Layout

    world = int(os.environ.get("WORLD_SIZE", args.world))  # torchrun decides the world size
    try:  # validate up front: a bad size is one clear line, not eight tracebacks
        planned = Layout.create(world, tp=args.tp, pp=args.pp, cp=args.cp, order=args.order)
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        print(describe(planned))
        return 0
    return 0 if layout_demo.run(args.world, args.tp, args.pp, args.cp, args.order) else 1


if __name__ == "__main__":
    sys.exit(main())
