"""Command line: ``python -m parallelkit {layout,demo,train,check-plan,info}``."""

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

    check = jobs.add_parser("check-plan", help="convert a shrunken copy of a transformers model "
                                               "with parallelize() on tp x cp local ranks and "
                                               "compare its loss and every gradient with the "
                                               "unconverted model (exit 0 match, 1 differ, 2 "
                                               "cannot convert)")
    check.add_argument("config", help="a transformers config.json (nothing is downloaded)")
    check.add_argument("--tp", type=int, required=True, help="tensor parallel size")
    check.add_argument("--cp", type=int, default=1, help="context parallel size (ranks: tp x cp)")
    # None = parallelize's own default, so the check runs what a plain parallelize(model) would.
    for option in ("sequence-parallel", "overlap-comm"):
        check.add_argument(f"--{option}", action=argparse.BooleanOptionalAction, default=None,
                           help="default: parallelize's")
    check.add_argument("--no-loss-parallel", dest="loss_parallel", action="store_false",
                       help="gather the logits for the loss instead of the vocab-parallel loss")
    check.add_argument("--plan", help="module:ATTR, a {pattern: ParallelStyle} dict or a "
                                      "callable model -> dict (default: the model's own plan)")

    from parallelkit.train import cli as train_cli

    train = train_cli.add_parser(jobs)
    jobs.add_parser("info", help="what was compiled: torch, CUDA arches, Triton")

    args = parser.parse_args(argv)
    if args.job == "info":
        from parallelkit.about import format_build_info

        print(format_build_info())
        return 0
    if args.job == "train":
        return train_cli.run(args, train)
    if args.job == "check-plan":
        return _check_plan(args, check)
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


def _check_plan(args, parser: argparse.ArgumentParser) -> int:
    from parallelkit.check_plan import check_plan

    try:
        report = check_plan(args.config, tp=args.tp, cp=args.cp, plan=args.plan,
                            sequence_parallel=args.sequence_parallel,
                            overlap_comm=args.overlap_comm, loss_parallel=args.loss_parallel)
    except ValueError as error:
        parser.error(str(error))  # exit code 2, one line
    print(report.format())
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
