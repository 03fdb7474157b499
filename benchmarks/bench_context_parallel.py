"""Context parallelism: activation memory per rank, causal load balance and step time of the ring.

Activation memory is measured as the bytes autograd saves for backward (``saved_tensors_hooks``)
in one forward of ``ContextParallelAttention`` on each CP rank, against single-device SDPA over
the whole sequence; the goal is ≤ 1.1 × (1/cp of full). Load balance is each rank's busy time in
the attention block kernels during forward + backward, as max/mean over ranks, for the zigzag and
the contiguous layouts (goal ≤ 1.05 for zigzag), measured twice: in the running ring (``busy``:
cp processes share the machine's cores, so it includes their contention) and ``serial``: every
rank's blocks of every ring step timed one rank after another in this process, the compute each
rank would do on a core of its own. ``median_ms``: one forward + backward of the ring, a step
ending when its slowest rank does (ranks start together after a barrier).

The peer: torch's ``torch.distributed.tensor.experimental.context_parallel`` (its ring attention
behind ``F.scaled_dot_product_attention``, with its head-tail load balancing: the zigzag
layout) on the same q, k, v, beside the zigzag rows. Its output must equal full attention's
(float32 tolerance) before it is timed, taking turns with ours step by step; ``ours/peer`` is
the median over steps of our step time over its. torch dispatches only the CUDA SDPA kernels
(flash, memory-efficient, cuDNN) to its ring, so on CPU ranks the notes give the error instead.

    python -m benchmarks.bench_context_parallel [--cp 4 --seq 1024 2048 4096 --heads 8 --dim 64]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import parallelkit.ops.ring_attention as ring_module
from benchmarks._harness import (Report, paired_ratio, publish, slowest_per_step, summarize,
                                 time_alternating)
from parallelkit import mpu
from parallelkit.context_parallel import ContextParallelAttention, split_for_context_parallel
from parallelkit.distributed.packed_layout import PackedLayout
from parallelkit.launch import LocalWorld
from parallelkit.ops.attention_block import attention_block_backward, attention_block_forward
from parallelkit.ops.ring_attention import ring_step_masks
from parallelkit.testing.tolerances import assert_close

QUICK = ["--cp", "2", "--seq", "256", "512", "--heads", "2", "--dim", "32", "--repeats", "3"]
COLUMNS = [("cp", "d"), ("seq", "d"), ("layout", ""), ("median_ms", ".1f"), ("iqr_ms", ".1f"),
           ("ours/peer", ".2f"), ("full_MB", ".1f"), ("ring_MB/rank", ".2f"),
           ("ring/(full/cp)", ".2f"), ("busy_ms_min", ".1f"), ("busy_ms_max", ".1f"),
           ("balance_max/mean", ".3f"), ("serial_balance", ".3f")]
PEER = "torch context_parallel"


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def inputs(seq: int, heads: int, dim: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, seq, dim, generator=g, requires_grad=True) for _ in range(3)]


def torch_context_parallel(group: dist.ProcessGroup, seq: int, heads: int, dim: int,
                           stack: contextlib.ExitStack):
    """torch's context parallelism on the same inputs, its context entered on ``stack`` (which
    shards q, k, v in place along the sequence, head-tail balanced): ``(step, None)`` once its
    output equals full attention's, else ``(None, why it cannot run)``."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    mesh = DeviceMesh.from_group(group, "cpu")
    q, k, v = (t.detach().clone() for t in inputs(seq, heads, dim))
    stack.enter_context(context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2],
                                         no_restore_buffers={q, k, v}))
    local = [t.requires_grad_() for t in (q, k, v)]
    try:
        out = F.scaled_dot_product_attention(*local, is_causal=True)
    except (NotImplementedError, RuntimeError) as error:
        stack.close()
        return None, f"{type(error).__name__}: {str(error).splitlines()[0]}"
    full = context_parallel_unshard(mesh, [out.detach()], [2])[0]
    expected = F.scaled_dot_product_attention(*inputs(seq, heads, dim), is_causal=True)
    assert_close(full, expected.detach(), terms=seq + dim,
                 name=f"{PEER} (seq={seq}) vs full attention")
    return lambda: F.scaled_dot_product_attention(*local, is_causal=True).sum().backward(), None


def measure(cp: int, seq: int, heads: int, dim: int, layout: str, repeats: int, warmup: int,
            with_peer: bool) -> dict:
    """On one rank: activation bytes of the ring, its busy time in the block kernels, and the
    times of forward + backward steps, taking turns with the peer's when it runs."""
    group = mpu.initialize(cp=cp).cp.group
    rank = dist.get_rank(group)
    local = [split_for_context_parallel(t.detach(), rank, cp, dim=2, layout=layout)
             .requires_grad_() for t in inputs(seq, heads, dim)]
    attention = ContextParallelAttention(group, layout)
    ring_bytes = saved_bytes(lambda: attention(*local, is_causal=True))

    busy = [0.0]
    timed = {}
    for name in ("attention_block_forward", "attention_block_backward"):
        original = getattr(ring_module, name)

        def clocked(*args, _original=original, **kwargs):
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            busy[0] += time.perf_counter() - start
            return result

        timed[name] = original
        setattr(ring_module, name, clocked)
    try:
        out = attention(*local, is_causal=True)
        out.sum().backward()
    finally:
        for name, original in timed.items():
            setattr(ring_module, name, original)
    steps = {"ours": lambda: attention(*local, is_causal=True).sum().backward()}
    with contextlib.ExitStack() as stack:
        peer, peer_error = (torch_context_parallel(group, seq, heads, dim, stack) if with_peer
                            else (None, None))
        if peer is not None:
            steps[PEER] = peer
        seconds = time_alternating(steps, repeats=repeats, warmup=warmup, group=group)
    return {"ring_bytes": ring_bytes, "busy_s": busy[0], "seconds": seconds,
            "peer_error": peer_error}


def full_attention_bytes(seq: int, heads: int, dim: int) -> int:
    q, k, v = inputs(seq, heads, dim)
    return saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))


def serial_busy(cp: int, seq: int, heads: int, dim: int, layout: str, repeats: int = 5,
                masks_of=None) -> list[float]:
    """Per rank: seconds of its forward + backward block work over all ring steps, timed here
    one step at a time (median of ``repeats``). ``masks_of(rank)``: that rank's step masks
    (default: one causal sequence in ``layout``)."""
    if masks_of is None:
        packed = PackedLayout.build([0, seq], cp, layout)

        def masks_of(rank):
            return ring_step_masks(packed, rank, True)
    q, k, v = (t.detach()[:, :, :seq // cp] for t in inputs(seq, heads, dim))
    busy = []
    for rank in [0] + list(range(cp)):  # rank 0 twice: the first pass only warms up
        total = 0.0
        for mask in masks_of(rank):
            if mask is None:
                continue
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                out, lse = attention_block_forward(q, k, v, ranges=mask)
                attention_block_backward(q, k, v, out, out, lse, ranges=mask)
                samples.append(time.perf_counter() - start)
            total += sorted(samples)[len(samples) // 2]
        busy.append(total)
    return busy[1:]


def run(cp: int, seqs: list[int], heads: int, dim: int, repeats: int,
        warmup: int) -> tuple[list[dict], list[str]]:
    rows, peer_errors = [], {}
    with LocalWorld(cp) as world:
        for seq in seqs:
            full = full_attention_bytes(seq, heads, dim)
            for layout in ("zigzag", "contiguous"):
                with_peer = layout == "zigzag"  # torch's causal layout is head-tail: zigzag
                per_rank = world.run(measure, cp, seq, heads, dim, layout, repeats, warmup,
                                     with_peer, timeout=600)
                busy = [r["busy_s"] for r in per_rank]
                peak = max(r["ring_bytes"] for r in per_rank)
                steps = {name: slowest_per_step([r["seconds"][name] for r in per_rank])
                         for name in per_rank[0]["seconds"]}
                rows.append({"cp": cp, "seq": seq, "layout": layout, **summarize(steps["ours"]),
                             "ours/peer": paired_ratio(steps["ours"], steps[PEER])
                             if PEER in steps else None,
                             "full_MB": full / 1e6, "ring_MB/rank": peak / 1e6,
                             "ring/(full/cp)": peak / (full / cp),
                             "busy_ms_min": min(busy) * 1e3, "busy_ms_max": max(busy) * 1e3,
                             "balance_max/mean": _balance(busy),
                             "serial_balance": _balance(serial_busy(cp, seq, heads, dim, layout))})
                if PEER in steps:
                    rows.append({"cp": cp, "seq": seq, "layout": PEER,
                                 **summarize(steps[PEER])})
                if per_rank[0]["peer_error"]:
                    peer_errors.setdefault(per_rank[0]["peer_error"], []).append(seq)
    notes = [f"{PEER} not measured (seq={', '.join(map(str, failed))}): on these CPU ranks "
             f"F.scaled_dot_product_attention inside it raises {error.rstrip('.')}. torch's "
             "ring attention handles only the CUDA SDPA kernels (aten._scaled_dot_product_"
             "flash_attention, _efficient_attention, _cudnn_attention); the CPU kernel has no "
             "DTensor sharding strategy"
             for error, failed in peer_errors.items()]
    return rows, notes


def _balance(busy: list[float]) -> float:
    return max(busy) / (sum(busy) / len(busy))


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed forward + backward steps")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    rows, notes = run(args.cp, args.seq, args.heads, args.dim, args.repeats, args.warmup)
    notes.append("median_ms: one forward + backward, the slowest rank's; ours/peer = median over "
                 f"steps of our step time / {PEER}'s step next to it (zigzag rows)")
    return Report("context_parallel", rows, COLUMNS, ["cp", "seq", "layout"],
                  {**vars(args), "backend": "gloo", "dtype": "float32", "causal": True}, notes,
                  plot_value="balance_max/mean")


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
