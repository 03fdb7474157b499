"""Fused ring matmuls vs collective-then-matmul: does the communication hide behind the GEMMs?

For ``all_gather_matmul`` (x [s/tp, b, h] → [s, b, n/tp]) and ``matmul_reduce_scatter``
(x [s, b, h/tp] → [s/tp, b, n]) on tp local gloo ranks, forward only, median over repeats:

    unfused  the collective, then one matmul (or one matmul, then the collective)
    fused    the native ring op (chunks_per_rank pieces per rank), on each ring transport:
             c10d (gloo's send/recv) and shm (the slot protocol in shared memory)
    gemm     the matmul alone, comm: the collective alone
    overlap efficiency = fused / max(gemm, comm): 1.0 would be perfect hiding
    torch    the peer: torch's async-TP ops ``torch.ops.symm_mem.fused_all_gather_matmul`` /
             ``fused_matmul_reduce_scatter`` on the same tensors, checked against the unfused
             result (float32 tolerance) before it is timed; ``ours/peer`` = fused / torch.
             They exist for CUDA and XPU tensors only (buffers in symmetric memory, which
             the ranks' GPUs map into each other), so on these CPU ranks the notes say why
             they have no row

    python -m benchmarks.bench_overlap [--tokens 2048 --hidden 2048 --tp 2 --chunks 1 2
                                        --transports c10d shm]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks._harness import Report, publish, summarize, time_op
from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.launch import LocalWorld
from parallelkit.ops import ring_transport
from parallelkit.ops.overlap import all_gather_matmul, matmul_reduce_scatter
from parallelkit.testing.tolerances import assert_close

QUICK = ["--tokens", "512", "--hidden", "512", "--tp", "2", "--chunks", "1", "2", "--repeats", "5",
         "--warmup", "1"]
COLUMNS = [("op", ""), ("tp", "d"), ("tokens", "d"), ("hidden", "d"), ("variant", ""),
           ("median_ms", ".1f"), ("iqr_ms", ".1f"), ("vs_unfused", ".2f"),
           ("fused/max(gemm,comm)", ".2f"), ("ours/peer", ".2f")]
PEERS = {"all_gather_matmul": "torch symm_mem.fused_all_gather_matmul",
         "matmul_reduce_scatter": "torch symm_mem.fused_matmul_reduce_scatter"}


def torch_fused(op: str, x: torch.Tensor, w: torch.Tensor, group: dist.ProcessGroup):
    """torch's async-TP op computing what ours does: ``F.linear(all_gather(x), w)`` or
    ``reduce_scatter(F.linear(x, w))`` along dim 0."""
    import torch.distributed._symmetric_memory  # noqa: F401  (registers torch.ops.symm_mem)

    if op == "all_gather_matmul":
        return lambda: torch.ops.symm_mem.fused_all_gather_matmul(
            x, [w.t()], 0, group.group_name, return_A=False)[1][0]
    return lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(x, w.t(), "sum", 0,
                                                                  group.group_name)


def check_peer(op: str, fn, expected: torch.Tensor, hidden: int) -> str | None:
    """Why the peer ``fn`` cannot run here (its exception's first sentence), or None when it
    ran; raises if it ran and disagrees with the unfused result."""
    try:
        out = fn()
    except (NotImplementedError, RuntimeError) as error:
        return f"{type(error).__name__}: {str(error).split('. ')[0].strip()}"
    assert_close(out, expected, name=f"{PEERS[op]} vs the unfused result", terms=hidden)
    return None


def _on(transport: str, fn):
    """``fn`` run on ``transport``, which it is checked to have used."""
    def run():
        with ring_transport.use(transport), ring_transport.count_transports() as used:
            out = fn()
        assert {kind for _, kind in used} == {transport}, used
        return out
    return run


def measure(op: str, tp: int, tokens: int, hidden: int, chunks: list[int], transports: list[str],
            repeats: int, warmup: int) -> dict:
    """On one rank: time every variant of ``op`` at [tokens, hidden] (batch folded into tokens)."""
    group = mpu.initialize(tp=tp).tp.group
    torch.manual_seed(dist.get_rank())
    with torch.no_grad():
        if op == "all_gather_matmul":
            x = torch.randn(tokens // tp, 1, hidden)
            w = torch.randn(hidden // tp, hidden)  # column-parallel: n/tp outputs
            gathered = torch.randn(tokens, 1, hidden)
            variants = {
                "unfused": lambda: F.linear(comm.all_gather(x, 0, group), w),
                "gemm": lambda: F.linear(gathered, w),
                "comm": lambda: comm.all_gather(x, 0, group),
                **{f"fused c={c} {t}": _on(t, lambda c=c: all_gather_matmul(x, w, group, c))
                   for c in chunks for t in transports},
            }
        else:
            x = torch.randn(tokens, 1, hidden // tp)
            w = torch.randn(hidden, hidden // tp)  # row-parallel: k/tp inputs
            partial = torch.randn(tokens, 1, hidden)
            variants = {
                "unfused": lambda: comm.reduce_scatter(F.linear(x, w), 0, group),
                "gemm": lambda: F.linear(x, w),
                "comm": lambda: comm.reduce_scatter(partial, 0, group),
                **{f"fused c={c} {t}": _on(t, lambda c=c: matmul_reduce_scatter(x, w, group, c))
                   for c in chunks for t in transports},
            }
        peer = torch_fused(op, x, w, group)
        peer_error = check_peer(op, peer, variants["unfused"](), hidden)
        if peer_error is None:
            variants["torch"] = peer
        times = {name: summarize(time_op(fn, repeats=repeats, warmup=warmup, group=group))
                 for name, fn in variants.items()}
        return {"times": times, "peer_error": peer_error}


def run(tokens: int, hidden: int, tp: int, chunks: list[int], transports: list[str],
        repeats: int, warmup: int):
    rows, notes = [], []
    with LocalWorld(tp) as local:
        for op in ("all_gather_matmul", "matmul_reduce_scatter"):
            result = local.run(measure, op, tp, tokens, hidden, chunks, transports, repeats,
                               warmup, timeout=600)[0]
            times = result["times"]
            if result["peer_error"]:
                notes.append(f"{PEERS[op]} not measured: on these CPU tensors it raises "
                             f"{result['peer_error']}. torch registers it for CUDA and XPU "
                             "tensors only (torch.distributed._symmetric_memory): it works in "
                             "symmetric-memory buffers that the ranks' GPUs map into each other")
            bound = max(times["gemm"]["median_ms"], times["comm"]["median_ms"])
            fused = [f"fused c={c} {t}" for c in chunks for t in transports]
            for name in ("gemm", "comm", "unfused", *fused,
                         *(["torch"] if "torch" in times else [])):
                ms = times[name]["median_ms"]
                rows.append({"op": op, "tp": tp, "tokens": tokens, "hidden": hidden,
                             "variant": PEERS[op] if name == "torch" else name, **times[name],
                             "vs_unfused": times["unfused"]["median_ms"] / ms,
                             "fused/max(gemm,comm)": ms / bound,
                             "ours/peer": ms / times["torch"]["median_ms"]
                             if name.startswith("fused") and "torch" in times else None,
                             # per rank, the same GEMM in every variant but the collective alone
                             **({} if name == "comm" else
                                {"flops": 2 * tokens * hidden * hidden // tp, "dtype": "float32"})})
    return rows, notes


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="s * b")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--transports", nargs="+", default=["c10d", "shm"],
                        choices=["c10d", "shm"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    rows, notes = run(args.tokens, args.hidden, args.tp, args.chunks, args.transports,
                      args.repeats, args.warmup)
    return Report("overlap", rows, COLUMNS, ["op", "tp", "tokens", "hidden", "variant"],
                  {**vars(args), "backend": "gloo", "dtype": "float32",
                   "note": "tp CPU processes, one intra-op thread each"}, notes)


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
