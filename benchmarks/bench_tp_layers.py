"""Tensor-parallel MLP (ColumnParallelLinear → GELU → RowParallelLinear): time and bytes moved.

For each tp (and with/without sequence parallelism) on tp local gloo ranks, one thread each (so
tp=1 is one process: the speed-up column is what splitting the layer bought on this machine, up
to its core count): forward+backward time
(median and interquartile spread over repeats, rank 0) and the bytes each rank sends, counted
from the collectives actually issued, next to the volume Megatron's algorithm needs: one
all-reduce of the ``[s, b, h]`` activations forward and one backward, or under sequence
parallelism an all-gather plus a reduce-scatter each way; on a ring both cost
``4 (tp-1)/tp · s·b·h·bytes`` per rank. A ratio above 1 means a layer communicates more than it
must.

    python -m benchmarks.bench_tp_layers [--seq 256 --batch 4 --hidden 512 --max-tp 4]
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
from parallelkit.tensor_parallel import ColumnParallelLinear, RowParallelLinear

QUICK = ["--seq", "64", "--batch", "2", "--hidden", "256", "--max-tp", "2", "--repeats", "5",
         "--warmup", "1"]
COLUMNS = [("tp", "d"), ("sp", ""), ("tokens", "d"), ("hidden", "d"), ("median_ms", ".1f"),
           ("iqr_ms", ".1f"), ("speedup_vs_tp1", ".2f"), ("sent_MB", ".2f"), ("theory_MB", ".2f"),
           ("sent/theory", ".3f"), ("collectives", "")]


def measure(tp: int, sequence_parallel: bool, seq: int, batch: int, hidden: int,
            repeats: int, warmup: int) -> dict:
    """On one rank: time the MLP's forward+backward and count what it communicates."""
    mpu.initialize(tp=tp)
    torch.manual_seed(0)
    up = ColumnParallelLinear(hidden, 4 * hidden, sequence_parallel=sequence_parallel)
    down = RowParallelLinear(4 * hidden, hidden, input_is_parallel=True,
                             sequence_parallel=sequence_parallel)
    x = torch.randn(seq // tp if sequence_parallel else seq, batch, hidden, requires_grad=True)

    def step():
        y = down(F.gelu(up(x)))
        y.backward(torch.ones_like(y))

    with comm.count_traffic() as traffic:
        step()
    seconds = time_op(step, repeats=repeats, warmup=warmup, group=dist.group.WORLD)
    return {"seconds": seconds, "wire_bytes": traffic.wire, "calls": dict(traffic.calls)}


def theoretical_wire_bytes(tp: int, seq: int, batch: int, hidden: int, elem: int,
                           sequence_parallel: bool = False) -> float:
    """What Megatron's algorithm puts on a ring per rank, in units of (tp-1)/tp·[s, b, h]: two
    all-reduces (forward, backward) of two units each (a reduce-scatter and an all-gather), and
    under sequence parallelism a fifth, the column layer's input gathered again in backward
    (only this rank's tokens are kept)."""
    units = 5 if sequence_parallel else 4
    return units * (tp - 1) / tp * seq * batch * hidden * elem


def run(seq: int, batch: int, hidden: int, max_tp: int, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for tp in (t for t in (1, 2, 4, 8) if t <= max_tp):
        with LocalWorld(tp) as local:
            for sequence_parallel in (False, True):
                result = local.run(measure, tp, sequence_parallel, seq, batch, hidden, repeats,
                                   warmup, timeout=600)[0]
                theory = theoretical_wire_bytes(tp, seq, batch, hidden, elem=4,
                                                sequence_parallel=sequence_parallel)
                rows.append({"tp": tp, "sp": sequence_parallel, "tokens": seq * batch,
                             "hidden": hidden, **summarize(result["seconds"]),
                             # per rank: up and down, 2·T·h·4h/tp each forward, twice that back
                             "flops": 48 * seq * batch * hidden**2 / tp, "dtype": "float32",
                             "sent_MB": result["wire_bytes"] / 1e6, "theory_MB": theory / 1e6,
                             "sent/theory": result["wire_bytes"] / theory if theory else 1.0,
                             "collectives": ",".join(f"{k}x{v}" for k, v in
                                                     sorted(result["calls"].items())) or "-"})
    for row in rows:
        base = next(r for r in rows if r["tp"] == 1 and r["sp"] == row["sp"])
        row["speedup_vs_tp1"] = base["median_ms"] / row["median_ms"]
    return rows


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--max-tp", type=int, default=4, help="largest tp (= local gloo ranks)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    rows = run(args.seq, args.batch, args.hidden, args.max_tp, args.repeats, args.warmup)
    return Report("tp_layers", rows, COLUMNS, ["tp", "sp", "tokens", "hidden"],
                  {**vars(args), "backend": "gloo", "dtype": "float32",
                   "note": "tp CPU processes, one thread each, share the machine's cores"})


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
