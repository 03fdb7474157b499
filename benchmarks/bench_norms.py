"""LayerNorm and RMSNorm over a TP-sharded hidden dim: forward and forward+backward time, GB/s.

For each norm and tp (local gloo ranks, one thread each; rank 0's times): parallelkit's op,
whose local steps are the Triton kernels on CUDA and the torch path on CPU (the ``backend``
column says which ran), and at tp=1 the baselines on the same full rows: torch eager
``F.layer_norm`` / ``F.rms_norm`` and ``torch.compile`` of that eager function. ``GB/s`` counts
the bytes a pass must move once per rank: forward reads x and writes y; forward+backward also
reads x and dy and writes dx (5 tensors of [tokens, hidden/tp]). ``%copy`` is that rate over the
copy bandwidth measured on the same device by the same process (one thread on CPU; HBM on a GPU).
``vs_eager``: eager's time over this row's (above 1: faster than eager). Times are medians;
``min_ms`` is the fastest repeat, the better guide on a machine others are loading.

On CUDA only tp=1 runs here (the local world is gloo on CPU); sharded GPU runs need torchrun.

    python -m benchmarks.bench_norms [--tokens 4096 --hidden 4096 --max-tp 2 --no-compile]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks._harness import format_table, summarize, write_results
from parallelkit import mpu
from parallelkit.launch import LocalWorld
from parallelkit.ops._backend import use_triton
from parallelkit.ops.norms import parallel_layer_norm, parallel_rms_norm

EPS = 1e-5


def timed(fn, repeats: int, warmup: int, device: str, group=None) -> list[float]:
    """Seconds per call of ``fn``; on CUDA the mean of 20 calls between two events."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        if group is not None and dist.get_world_size(group) > 1:
            dist.barrier(group)  # start together: a rank's time includes waiting for its peers
        if device == "cuda":
            start, end, inner = torch.cuda.Event(True), torch.cuda.Event(True), 20
            torch.cuda.synchronize()
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            begin = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - begin)
    return seconds


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on a tensor far above cache size."""
    numel = (1 << 28 if device == "cuda" else 1 << 24)  # 1 GiB / 64 MiB of float32
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    median = summarize(timed(lambda: dst.copy_(src), repeats, 1, device))["median_ms"] / 1e3
    return 2 * src.numel() * src.element_size() / median


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
    rows = []
    for name, fn in variants(norm, tp, use_compile, hidden).items():
        begin = time.perf_counter()
        fn(x, w, b).backward(dy)  # a compile happens here
        first_s = time.perf_counter() - begin
        for what, step in (("fwd", lambda: fn(x, w, b)),
                           ("fwd+bwd", lambda: fn(x, w, b).backward(dy))):
            seconds = timed(step, repeats, warmup, device, state.tp.group)
            rows.append({"variant": name, "pass": what, "first_call_s": first_s,
                         **summarize(seconds), "min_ms": min(seconds) * 1e3})
    return {"device": device, "backend": "triton" if use_triton(x) else "torch",
            "copy_Bps": copy_bandwidth(device, repeats), "rows": rows}


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
                    moved = (2 if row["pass"] == "fwd" else 5) * tokens * (hidden // tp) * elem
                    rate = moved / (row["median_ms"] / 1e3)
                    backend = result["backend"] if row["variant"] == "parallelkit" else "torch"
                    rows.append({"norm": norm, "tp": tp, "tokens": tokens,
                                 "hidden/tp": hidden // tp, "device": result["device"],
                                 "backend": backend, **row,
                                 "GB/s": rate / 1e9, "%copy": 100 * rate / result["copy_Bps"],
                                 "copy_GB/s": result["copy_Bps"] / 1e9})
    for row in rows:
        eager = next((r for r in rows if r["norm"] == row["norm"] and r["pass"] == row["pass"]
                      and r["variant"] == "eager"), None)
        row["vs_eager"] = eager["median_ms"] / row["median_ms"] if eager else float("nan")
    return rows, notes


def main(argv=None) -> None:
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
    print(format_table(rows, [("norm", ""), ("tp", "d"), ("hidden/tp", "d"), ("variant", ""),
                              ("backend", ""), ("pass", ""), ("median_ms", ".2f"),
                              ("iqr_ms", ".2f"), ("min_ms", ".2f"), ("vs_eager", ".2f"),
                              ("GB/s", ".2f"),
                              ("%copy", ".0f"), ("first_call_s", ".1f")]))
    copy = {(r["tp"], round(r["copy_GB/s"], 1)) for r in rows}
    print("measured copy bandwidth (GB/s, rank 0 of each tp):", sorted(copy))
    for note in notes:
        print("note:", note)
    path = write_results("norms", rows, {**vars(args), "notes": notes,
                                         "note": "tp processes, one thread each, share the "
                                                 "machine's cores"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
