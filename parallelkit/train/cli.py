"""``python -m parallelkit train``: the options of :class:`TrainConfig` on the command line.

    python -m parallelkit train --world 8 --tp 2 --pp 2 --steps 100 --checkpoint-dir ckpt
    torchrun --nproc-per-node 8 -m parallelkit train --tp 2 --cp 2 --model llama-tiny ...
"""

from __future__ import annotations

import argparse
import json
import os

from parallelkit.train.config import DATA_DTYPES, PRECISIONS, TrainConfig

DEFAULTS = TrainConfig()


def add_parser(jobs) -> argparse.ArgumentParser:
    p = jobs.add_parser("train", help="train a model with TP x CP x DP or TP x PP x DP, with "
                                      "checkpoints and bit-exact resume",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--world", type=int, help="local gloo ranks to fork (default tp*pp*cp; "
                                             "ignored under torchrun)")
    for name in ("tp", "pp", "cp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--model", default=d.model, help="'tinylm', 'llama-tiny' or a transformers "
                                                    "config.json (nothing is downloaded)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field (repeatable; VALUE as JSON)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch,
                   help="sequences per micro-batch per DP rank")
    p.add_argument("--global-batch", type=int, default=d.global_batch,
                   help="sequences per optimizer step (accumulation = global / (micro x dp))")
    p.add_argument("--seq", type=int, default=d.seq, help="tokens per sequence")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    p.add_argument("--zero", action="store_true", help="ZeRO-1: shard the optimizer over DP")
    p.add_argument("--recompute", choices=("selective", "full"), default=None)
    p.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_const",
                   const=False, default=None)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup", dest="warmup_steps", type=int, default=d.warmup_steps)
    p.add_argument("--betas", type=float, nargs=2, default=d.betas)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0: no clipping")
    p.add_argument("--steps", type=int, default=d.steps, help="steps of the run (and schedule)")
    p.add_argument("--stop-after", type=int, help="stop after this step (checkpointed); a "
                                                  "later call resumes")
    p.add_argument("--data", default=d.data, help="'synthetic' or a flat token file (nanoGPT's "
                                                  "train.bin)")
    p.add_argument("--data-dtype", choices=DATA_DTYPES, default=d.data_dtype)
    p.add_argument("--synthetic-samples", type=int, default=d.synthetic_samples)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start afresh even if checkpoint-dir holds a checkpoint")
    p.add_argument("--peak-tflops", type=float, help="per device, for the MFU (default: a GEMM "
                                                     "measured at start)")
    p.add_argument("--plot", default="train_loss.png", help="loss curve PNG ('' = none)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from parallelkit.train.loop import train

    fields = set(TrainConfig.__dataclass_fields__) - {"model_args", "betas", "grad_clip", "plot"}
    values = {k: v for k, v in vars(args).items() if k in fields}
    try:
        cfg = TrainConfig(**values, model_args=_model_args(args.model_arg),
                          betas=tuple(args.betas), grad_clip=args.grad_clip or None,
                          plot=args.plot or None)
        result = train(cfg)
    except ValueError as error:
        parser.error(str(error))  # exit code 2, one line
    if int(os.environ.get("RANK", 0)) == 0:
        print(result.summary())
        if cfg.plot and result.losses:
            print(f"wrote {cfg.plot}")
    return 0


def _model_args(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--model-arg {pair!r} must be KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out
