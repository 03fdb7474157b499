"""LayerNorm and RMSNorm over a TP-sharded hidden dim: forward and forward+backward time, GB/s.

For each norm and tp (local gloo ranks, one thread each; rank 0's times): parallelkit's op,
whose local steps are the Triton kernels on CUDA and the torch path on CPU (the ``backend``
column says which ran), and at tp=1 the baselines on the same full rows: torch eager
``F.layer_norm`` / ``F.rms_norm`` and ``torch.compile`` of that eager function. ``achieved`` counts
the bytes a pass must move once per rank: forward reads x and writes y; forward+backward also
reads x and dy and writes dx (5 tensors of [tokens, hidden/tp]); ``%peak`` is that rate over the
copy bandwidth the harness measured on the same device (one thread on CPU; HBM on a GPU).
``vs_eager``: eager's time over this row's (above 1: faster than eager). Times are medians;
``min_ms`` is the fastest repeat, the better guide on a machine others are loading. Before they
are timed, eager's and the compiled output and gradients (x, weight, bias) must equal ours on
the same rows (the dtype's tolerance).

On CUDA only tp=1 runs here (the local world is gloo on CPU); sharded GPU runs need torchrun.

    python -m benchmarks.bench_norms [--tokens 4096 --hidden 4096 --max-tp 2 --no-compile]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks._harness import Report, publish, summarize, time_op
from parallelkit import mpu
from parallelkit.launch import LocalWorld
from parallelkit.ops._backend import use_triton
from parallelkit.ops.norms import parallel_layer_norm, parallel_rms_norm
from parallelkit.testing.tolerances import assert_close

EPS = 1e-5
QUICK = ["--tokens", "1024", "--hidden", "1024", "--max-tp", "2", "--repeats", "5", "--no-compile"]
GPU = ["--tokens", "16384", "--hidden", "8192", "--dtype", "bfloat16", "--max-tp", "1"]
COLUMNS = [("norm", ""), ("tp", "d"), ("hidden/tp", "d"), ("variant", ""), ("backend", ""),
           ("pass", ""), ("median_ms", ".2f"), ("iqr_ms", ".2f"), ("min_ms", ".2f"),
           ("vs_eager", ".2f"), ("first_call_s", ".1f")]


def variants(norm: str, tp: int, use_compile: bool, hidden: int) -> dict:
    """name -> fn(x, weight, bias): ours at every tp, the baselines at tp=1."""
    rms = norm == "rms"
    if rms:
        found = {"parallelkit": lambda x, w, b: parallel_rms_norm(x, w, EPS)}

        def eager(x, w, b):
            return F.rms_norm(x, (hidden,), w, EPS)
    else:
        found = {"parallelkit": lambda x, w, b: parallel_layer_norm(x, w, b, EPS)}

        def eager(x, w, b):
            return F.layer_norm(x, (hidden,), w, b, EPS)
    if tp == 1:
        found["eager"] = eager
        if use_compile:
            found["compile"] = torch.compile(eager)
    return found


def measure(tp: int, norm: str, tokens: int, hidden: int, dtype: str, repeats: int,
            warmup: int, use_compile: bool) -> dict:
    """On one rank: each variant's forward and forward+backward times."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and tp > 1:
        return {"device": device, "rows": []}
    state = mpu.initialize(tp=tp)
    local = hidden // tp
    g = torch.Generator(device).manual_seed(state.tp.rank)
    kw = dict(device=device, dtype=getattr(torch, dtype))
    x = torch.randn(tokens, local, generator=g, **kw).requires_grad_()
    dy = torch.randn(tokens, local, generator=g, **kw)
    w = torch.ones(local, **kw).requires_grad_()
    b = torch.zeros(local, **kw).requires_grad_()
    rows, ours = [], None
    for name, fn in variants(norm, tp, use_compile, hidden).items():
        x.grad = w.grad = b.grad = None  # the previous variant's timed calls accumulated some
        begin = time.perf_counter()
        out = fn(x, w, b)  # a compile happens here
        out.backward(dy)
        first_s = time.perf_counter() - begin
        # copies: the timed calls below accumulate into these gradients
        result = [out.detach()] + [t.grad.clone() for t in (x, w, b) if t.grad is not None]
        if ours is None:  # parallelkit's, the first
            ours = result
        for what, actual, expected in zip(("output", "x grad", "weight grad", "bias grad"),
                                          result, ours):
            assert_close(actual, expected, name=f"{norm} norm, {name} vs parallelkit: {what}",
                         terms=tokens + hidden)
        for what, step in (("fwd", lambda: fn(x, w, b)),
                           ("fwd+bwd", lambda: fn(x, w, b).backward(dy))):
            seconds = time_op(step, device=device, repeats=repeats, warmup=warmup,
                              group=state.tp.group)
            rows.append({"variant": name, "pass": what, "first_call_s": first_s,
                         **summarize(seconds), "min_ms": min(seconds) * 1e3})
    return {"device": device, "backend": "triton" if use_triton(x) else "torch", "rows": rows}


def run(tokens: int, hidden: int, max_tp: int, dtype: str, repeats: int, warmup: int,
        use_compile: bool) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    elem = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    for tp in (t for t in (1, 2, 4, 8) if t <= max_tp):
        if hidden % tp:
            notes.append(f"tp={tp} skipped: hidden={hidden} is not divisible by it")
            continue
        with LocalWorld(tp) as world:
            for norm in ("layer", "rms"):
                result = world.run(measure, tp, norm, tokens, hidden, dtype, repeats, warmup,
                                   use_compile, timeout=600)[0]
                if not result["rows"]:
                    notes.append(f"tp={tp} skipped on {result['device']}: the local world is gloo "
                                 "on CPU; run sharded GPU norms under torchrun")
                    continue
                for row in result["rows"]:
                    backend = result["backend"] if row["variant"] == "parallelkit" else "torch"
                    rows.append({"norm": norm, "tp": tp, "tokens": tokens,
                                 "hidden/tp": hidden // tp, "device": result["device"],
                                 "backend": backend, **row,
                                 "bytes": (2 if row["pass"] == "fwd" else 5) * tokens
                                 * (hidden // tp) * elem})
    for row in rows:
        eager = next((r for r in rows if r["norm"] == row["norm"] and r["pass"] == row["pass"]
                      and r["variant"] == "eager"), None)
        row["vs_eager"] = eager["median_ms"] / row["median_ms"] if eager else float("nan")
    return rows, notes


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--max-tp", type=int, default=2, help="largest tp (= local gloo ranks)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    rows, notes = run(args.tokens, args.hidden, args.max_tp, args.dtype, args.repeats,
                      args.warmup, args.compile)
    return Report("norms", rows, COLUMNS, ["norm", "tp", "hidden/tp", "variant", "pass"],
                  {**vars(args), "note": "tp processes, one thread each, share the machine's "
                                         "cores"}, notes)


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
