"""Vocab-parallel cross-entropy: forward+backward time, bandwidth, traffic and peak memory.

Per tokens x vocab shape, each variant in a fresh local world of tp gloo ranks, one thread each:

    tp=1   vocab_parallel_cross_entropy (a group of one), also with inplace_backward
           F.cross_entropy eager, and torch.compile'd (skipped with --no-compile)
    tp>1   vocab_parallel_cross_entropy on each rank's [T, V/tp], also with inplace_backward
           all-gather the logits (gather_from_tp_region), then F.cross_entropy: what TP without a
           vocab-parallel loss does

``backend`` says what ran our op's local steps: on CPU its torch path (the Triton kernels need a
GPU; their interpreter is a checker, not a benchmark). ``achieved`` counts the bytes one fused
pass must move per rank, reading the logits and writing their gradient (2·T·V/tp·elem), and
``%peak`` compares it with the copy bandwidth the harness measured (one thread on CPU).
``sent_MB``: what rank 0 put on a ring, counted from the collectives issued. Memory per rank,
beyond the logits:
``peak_MB`` is measured, the rise of the process's peak RSS over one forward+backward in a fresh
process (``torch.cuda.max_memory_allocated`` on a GPU); ``floor_MB`` is computed, the least the
approach must materialize: the gradient (none in place), plus the gathered logits when gathering.
Each baseline's loss and logits gradient must equal our vocab-parallel loss's on the same logits
(float32 tolerance), checked after the memory step and before it is timed.

    python -m benchmarks.bench_cross_entropy [--shapes 2048x32000 --max-tp 2 --no-compile]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks._harness import Report, publish, summarize, time_op
from parallelkit import mpu
from parallelkit.distributed import comm, mappings
from parallelkit.launch import LocalWorld
from parallelkit.ops._backend import use_triton
from parallelkit.ops.cross_entropy import vocab_parallel_cross_entropy
from parallelkit.testing.tolerances import assert_close

QUICK = ["--shapes", "512x8192", "--max-tp", "2", "--repeats", "5", "--no-compile"]
GPU = ["--shapes", "8192x131072", "--max-tp", "1", "--repeats", "10"]
COLUMNS = [("tokens", "d"), ("vocab", "d"), ("tp", "d"), ("variant", ""), ("backend", ""),
           ("device", ""), ("median_ms", ".1f"), ("iqr_ms", ".1f"), ("vs_eager_tp1", ".2f"),
           ("sent_MB", ".2f"), ("peak_MB", ".0f"), ("floor_MB", ".0f")]
VARIANTS = {  # name -> (tp=1 only, inplace_backward)
    "vocab_parallel": (False, False),
    "vocab_parallel inplace": (False, True),
    "torch eager": (True, None),
    "torch.compile": (True, None),
    "gather + eager": (False, None),
}


def loss_function(variant: str, group: dist.ProcessGroup):
    if variant.startswith("vocab_parallel"):
        inplace = VARIANTS[variant][1]
        return lambda x, t: vocab_parallel_cross_entropy(x, t, group, inplace_backward=inplace)
    if variant == "gather + eager":
        return lambda x, t: F.cross_entropy(mappings.gather_from_tp_region(x, group), t)
    return torch.compile(F.cross_entropy) if variant == "torch.compile" else F.cross_entropy


def measure(variant: str, tokens: int, vocab: int, repeats: int, warmup: int) -> dict:
    """On one rank of a fresh world: peak memory of the first step, then the time of others."""
    state = mpu.initialize(tp=dist.get_world_size())
    device = torch.device("cuda" if torch.cuda.is_available() and state.tp.size == 1 else "cpu")
    g = torch.Generator(device).manual_seed(state.tp.rank)
    x = torch.randn(tokens, vocab // state.tp.size, generator=g, device=device, requires_grad=True)
    # the same targets on every rank: each rank holds a slice of the same tokens' logits
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator(device).manual_seed(1),
                            device=device)
    fn = loss_function(variant, state.tp.group)

    def step():
        fn(x, targets).backward()
        x.grad = None

    if variant == "torch.compile":
        start = time.perf_counter()
        step()  # compiles; the memory step below then measures the compiled code
        compile_s = time.perf_counter() - start
    before = _memory_now(device)
    with comm.count_traffic() as traffic:
        step()
    peak = _memory_peak(device) - before
    ours = variant.startswith("vocab_parallel")
    if not ours:
        check_against_ours(variant, fn, x, targets, state.tp.group, vocab)
    seconds = time_op(step, device=device, repeats=repeats, warmup=warmup, group=state.tp.group)
    return {"seconds": seconds, "peak_bytes": peak, "wire_bytes": traffic.wire,
            "device": device.type, "compile_s": compile_s if variant == "torch.compile" else None,
            "backend": ("triton" if use_triton(x) else "torch") if ours else "torch"}


def check_against_ours(variant: str, fn, x: torch.Tensor, targets: torch.Tensor,
                       group: dist.ProcessGroup, vocab: int) -> None:
    """A baseline's loss and logits gradient against our vocab-parallel loss's on this rank's
    logits (after the memory step, which must see this process's first allocation peak)."""
    results = []
    for loss_fn in (fn, loss_function("vocab_parallel", group)):
        loss = loss_fn(x, targets)
        loss.backward()
        results.append((loss.detach(), x.grad))
        x.grad = None
    terms = x.shape[0] + vocab  # the log-sum-exp over the vocabulary, the mean over the tokens
    for what, actual, expected in zip(("loss", "logits grad"), *results):
        assert_close(actual, expected, name=f"{variant} vs vocab_parallel: {what}", terms=terms)


def floor_bytes(variant: str, tokens: int, vocab: int, tp: int, elem: int = 4) -> int:
    if variant == "vocab_parallel inplace":
        return 0
    if variant == "gather + eager":
        return 2 * tokens * vocab * elem  # the gathered logits and their full gradient
    return tokens * vocab // tp * elem


def run(shapes: list[tuple[int, int]], max_tp: int, repeats: int, warmup: int,
        compile_: bool) -> list[dict]:
    rows = []
    for tokens, vocab in shapes:
        for tp in (t for t in (1, 2, 4, 8) if t <= max_tp):
            for variant, (tp1_only, _) in VARIANTS.items():
                if (tp1_only and tp > 1) or (variant == "gather + eager" and tp == 1) or (
                        variant == "torch.compile" and not compile_):
                    continue
                with LocalWorld(tp) as world:  # fresh processes: a clean peak-memory reading
                    result = world.run(measure, variant, tokens, vocab, repeats, warmup,
                                       timeout=600)[0]
                rows.append({"tokens": tokens, "vocab": vocab, "tp": tp, "variant": variant,
                             "backend": result["backend"], "device": result["device"],
                             **summarize(result["seconds"]), "bytes": 2 * tokens * vocab // tp * 4,
                             "sent_MB": result["wire_bytes"] / 1e6,
                             "peak_MB": result["peak_bytes"] / 1e6,
                             "floor_MB": floor_bytes(variant, tokens, vocab, tp) / 1e6,
                             "compile_s": result["compile_s"]})
    for row in rows:
        base = next(r for r in rows if r["tokens"] == row["tokens"] and r["vocab"] == row["vocab"]
                    and r["tp"] == 1 and r["variant"] == "torch eager")
        row["vs_eager_tp1"] = base["median_ms"] / row["median_ms"]
    return rows


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048x32000",
                        help="comma-separated TOKENSxVOCAB; vocab divisible by every tp")
    parser.add_argument("--max-tp", type=int, default=2, help="largest tp (= local gloo ranks)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile (its first call takes ~20 s on 2 CPU cores)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    rows = run(shapes, args.max_tp, args.repeats, args.warmup, not args.no_compile)
    notes = ["times per rank, ranks one thread each; peak_MB measured, floor_MB computed"]
    compiled = [r for r in rows if r["compile_s"] is not None]
    if compiled:
        notes.append("torch.compile's first call took "
                     + ", ".join(f"{r['compile_s']:.0f} s" for r in compiled))
    return Report("cross_entropy", rows, COLUMNS, ["tokens", "vocab", "tp", "variant"],
                  {**vars(args), "dtype": "float32", "backend_comm": "gloo",
                   "note": "tp CPU processes, one thread each, share the machine's cores"}, notes)


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
