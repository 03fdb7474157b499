"""Packed sequences under context parallelism: each rank's causal work under three splits of a
packed sequence, and ring attention's time per token packed against unpacked.

Document lengths are drawn (seed 0) until they fill S tokens, the last one cut to fit, then each
is padded to a multiple of 2·cp (the padding rule of ``distributed/packed_layout.py``):

    pretrain   log-normal, median 600 tokens, sigma 1.2: many short documents, a few long ones
    finetune   uniform in [64, 1024]

The splits over cp ranks:

    doc-zigzag       each document in 2·cp chunks, rank r holding chunks r and 2·cp-1-r of every
                     document (``PackedLayout``: what ring attention here takes)
    doc-contiguous   each document in cp chunks, rank r holding chunk r of every document
    seq-contiguous   the packed sequence cut into cp slices wherever the documents fall

Per rank, over all its ring steps: ``pairs``, the visible causal (query, key) pairs; ``tiles``,
the 64 × 64 tiles the forward kernel visits (each 64-query tile loops over the keys its rows
see); ``serial``, the seconds of its forward + backward block work, each rank's steps timed one
rank after another in this process (the torch path on CPU, windows of 256 query rows). Each is
reported as max/mean over the ranks: 1.0 is perfect balance; a ring step waits for its slowest
rank.

Time per token: one forward + backward of ring attention (doc-zigzag) over cp local gloo ranks
on the packed sequence, against one causal sequence of the same S tokens (``unpacked``), taking
turns step by step; a step ends when its slowest rank does.

    python -m benchmarks.bench_packed [--cp 4 --seq 8192 --heads 4 --dim 64]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist

from benchmarks._harness import (Report, paired_ratio, publish, slowest_per_step, summarize,
                                 time_alternating)
from benchmarks.bench_context_parallel import inputs, serial_busy
from parallelkit import mpu
from parallelkit.context_parallel import ContextParallelAttention
from parallelkit.distributed.packed_layout import PackedLayout, pad_documents, split_packed
from parallelkit.launch import LocalWorld
from parallelkit.ops.attention_mask import KeyRanges, document_ranges
from parallelkit.ops.ring_attention import ring_step_masks

QUICK = ["--cp", "2", "--seq", "2048", "--heads", "2", "--dim", "32", "--repeats", "3"]
COLUMNS = [("mix", ""), ("docs", "d"), ("split", ""), ("pairs_max/mean", ".3f"),
           ("tiles_max/mean", ".3f"), ("serial_max/mean", ".3f"), ("median_ms", ".1f"),
           ("us/token", ".2f"), ("packed/unpacked", ".2f")]
SPLITS = ("doc-zigzag", "doc-contiguous", "seq-contiguous")
TILE = 64


def document_lengths(mix: str, seq: int, multiple: int) -> list[int]:
    """Real lengths of the documents filling ``seq`` tokens once each is padded to
    ``multiple``."""
    g = torch.Generator().manual_seed(0)
    lengths, used = [], 0
    while used < seq:
        if mix == "pretrain":
            n = int(math.exp(math.log(600) + 1.2 * torch.randn(1, generator=g).item()))
        else:
            n = int(torch.randint(64, 1025, (1,), generator=g))
        n = max(1, min(n, seq - used))
        padded = -(-n // multiple) * multiple
        if used + padded > seq:  # the last document: cut to the room left
            padded = seq - used
            n = padded
        lengths.append(n)
        used += padded
    return lengths


def split_masks(split: str, cu_seqlens: list[int], cp: int):
    """``masks_of(rank)``: the step masks of each rank under ``split``."""
    if split != "seq-contiguous":
        packed = PackedLayout.build(cu_seqlens, cp, split.removeprefix("doc-"))
        return lambda rank: ring_step_masks(packed, rank, True)
    bounds, local = torch.tensor(cu_seqlens), cu_seqlens[-1] // cp

    def placed(rank):
        pos = torch.arange(rank * local, (rank + 1) * local)
        return pos, torch.searchsorted(bounds, pos, right=True) - 1

    def masks_of(rank):
        masks = []
        for step in range(cp):
            kv_rank = (rank - step) % cp
            if kv_rank > rank:  # every key after every query
                masks.append(None)
                continue
            (q_pos, q_doc), (k_pos, k_doc) = placed(rank), placed(kv_rank)
            masks.append(document_ranges(q_pos, k_pos, True, q_doc, k_doc, check=False))
        return masks
    return masks_of


def pairs(masks: list[KeyRanges | None]) -> int:
    return sum(int((m.key_end - m.key_start).clamp(min=0).sum()) for m in masks if m is not None)


def tiles(masks: list[KeyRanges | None]) -> int:
    """The key tiles the forward kernel's 64-query programs visit (per head): each loops from
    its rows' first key, rounded down to a tile, to their last."""
    total = 0
    for m in masks:
        if m is not None:
            first, last = m.row_windows(TILE)
            begin = torch.div(first, TILE, rounding_mode="floor") * TILE
            total += int(torch.where(last > first, (last - begin + TILE - 1) // TILE, 0).sum())
    return total


def balance(values: list[float]) -> float:
    return max(values) / (sum(values) / len(values))


def time_packed(cp: int, seq: int, heads: int, dim: int, cu_seqlens: list[int], repeats: int,
                warmup: int) -> dict:
    """On one rank: forward + backward step times of the ring, packed and unpacked."""
    group = mpu.initialize(cp=cp).cp.group
    rank = dist.get_rank(group)
    attention = ContextParallelAttention(group)
    packed = PackedLayout.build(cu_seqlens, cp)
    whole = PackedLayout.build([0, seq], cp)
    bounds = torch.tensor(cu_seqlens)
    local = {name: [split_packed(t.detach(), layout, rank, dim=2).requires_grad_()
                    for t in inputs(seq, heads, dim)]
             for name, layout in (("packed", packed), ("unpacked", whole))}
    steps = {
        "packed": lambda: attention(*local["packed"], is_causal=True,
                                    cu_seqlens=bounds).sum().backward(),
        "unpacked": lambda: attention(*local["unpacked"], is_causal=True).sum().backward(),
    }
    return time_alternating(steps, repeats=repeats, warmup=warmup, group=group)


def run(cp: int, seq: int, heads: int, dim: int, repeats: int, warmup: int) -> list[dict]:
    rows = []
    with LocalWorld(cp) as world:
        for mix in ("pretrain", "finetune"):
            lengths = document_lengths(mix, seq, 2 * cp)
            cu_seqlens, _ = pad_documents([0] + torch.tensor(lengths).cumsum(0).tolist(),
                                          2 * cp)
            for split in SPLITS:
                masks_of = split_masks(split, cu_seqlens, cp)
                per_rank = [masks_of(r) for r in range(cp)]
                rows.append({"mix": mix, "docs": len(lengths), "split": split,
                             "pairs_max/mean": balance([pairs(m) for m in per_rank]),
                             "tiles_max/mean": balance([tiles(m) for m in per_rank]),
                             "serial_max/mean": balance(serial_busy(
                                 cp, seq, heads, dim, "zigzag", repeats, masks_of=masks_of))})
            per_rank = world.run(time_packed, cp, seq, heads, dim, cu_seqlens, repeats, warmup,
                                 timeout=900)
            steps = {name: slowest_per_step([r[name] for r in per_rank])
                     for name in ("packed", "unpacked")}
            for name in ("packed", "unpacked"):
                stats = summarize(steps[name])
                rows.append({"mix": mix, "docs": len(lengths) if name == "packed" else 1,
                             "split": f"ring {name}", **stats,
                             "us/token": stats["median_ms"] * 1e3 / seq,
                             "packed/unpacked": paired_ratio(steps["packed"], steps["unpacked"])
                             if name == "packed" else None})
    return rows


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    rows = run(args.cp, args.seq, args.heads, args.dim, args.repeats, args.warmup)
    notes = ["max/mean over the cp ranks of each rank's total over its ring steps: pairs and "
             "tiles counted exactly, serial timed (median of repeats) one rank at a time",
             "ring rows: one forward + backward, the slowest rank's; packed/unpacked = median "
             "over steps of the packed step time / the unpacked step next to it"]
    return Report("packed", rows, COLUMNS, ["mix", "split"],
                  {**vars(args), "backend": "gloo", "dtype": "float32", "causal": True}, notes,
                  plot_value="tiles_max/mean")


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
