"""Tensor-parallel MLP (ColumnParallelLinear → GELU → RowParallelLinear): time and bytes moved,
next to torch's DTensor tensor parallelism on the same MLP.

For each tp (and with/without sequence parallelism) on tp local gloo ranks, one thread each (so
tp=1 is one process: the speed-up column is what splitting the layer bought on this machine, up
to its core count): the forward+backward time of one step and the bytes each rank sends, counted
from the collectives actually issued, next to the volume Megatron's algorithm needs: one
all-reduce of the ``[s, b, h]`` activations forward and one backward, or under sequence
parallelism an all-gather plus a reduce-scatter each way and the column layer's input gathered
again in backward; on a ring an all-reduce costs ``2 (tp-1)/tp · s·b·h·bytes`` per rank. A ratio
above 1 means a layer communicates more than it must.

The peer, at tp > 1 in the same processes: torch's ``parallelize_module`` with
``ColwiseParallel``/``RowwiseParallel`` on an ``nn.Linear → GELU → nn.Linear`` MLP holding the
same weights; under sequence parallelism ``ColwiseParallel(input_layouts=Shard(0))`` and
``RowwiseParallel(output_layouts=Shard(0))`` on the same sequence-sharded input
``[s/tp, b, h]``. Its collectives (DTensor's functional ones) are counted from the dispatcher.
Both MLPs' output, input gradient and weight gradients must equal the dense MLP's (float32
tolerance) before anything is timed. The two then take turns step by step; a step ends when its
slowest rank does (ranks start together after a barrier); ``ours/peer`` is the median over steps
of our step time over torch's step next to it.

    python -m benchmarks.bench_tp_layers [--seq 256 --batch 4 --hidden 512 --max-tp 4]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._harness import (Report, paired_ratio, publish, slowest_per_step, summarize,
                                 time_alternating)
from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.launch import LocalWorld, RankFailure
from parallelkit.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from parallelkit.testing.tolerances import assert_close

QUICK = ["--seq", "64", "--batch", "2", "--hidden", "256", "--max-tp", "2", "--repeats", "5",
         "--warmup", "1"]
COLUMNS = [("tp", "d"), ("sp", ""), ("variant", ""), ("tokens", "d"), ("hidden", "d"),
           ("median_ms", ".1f"), ("iqr_ms", ".1f"), ("speedup_vs_tp1", ".2f"),
           ("ours/peer", ".2f"), ("sent_MB", ".2f"), ("theory_MB", ".2f"), ("sent/theory", ".3f"),
           ("collectives", "")]
PEER = "torch DTensor"


class MLP(nn.Module):
    """The dense MLP: ``x [s, b, h] → [s, b, h]``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class OurMLP(nn.Module):
    def __init__(self, dense: MLP, sequence_parallel: bool):
        super().__init__()
        self.up = ColumnParallelLinear.from_dense(dense.up, sequence_parallel=sequence_parallel)
        self.down = RowParallelLinear.from_dense(dense.down, input_is_parallel=True,
                                                 sequence_parallel=sequence_parallel)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def torch_mlp(dense: MLP, sequence_parallel: bool, tp_group: dist.ProcessGroup) -> nn.Module:
    """The same weights under torch's DTensor tensor parallelism."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    plan = ({"up": ColwiseParallel(input_layouts=Shard(0)),
             "down": RowwiseParallel(output_layouts=Shard(0))} if sequence_parallel
            else {"up": ColwiseParallel(), "down": RowwiseParallel()})
    return parallelize_module(copy.deepcopy(dense), DeviceMesh.from_group(tp_group, "cpu"), plan)


class FunctionalCollectives(TorchDispatchMode):
    """Counts DTensor's functional collectives into a ``comm.Traffic`` (payload as comm counts
    it: the all-reduced tensor, the gathered output, the reduce-scattered input)."""

    def __init__(self, group_size: int):
        super().__init__()
        self.traffic, self.group_size = comm.Traffic(), group_size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "_c10d_functional" and torch.is_tensor(args[0]) and name not in (
                "wait_tensor", "_wrap_tensor_autograd"):
            nbytes = args[0].numel() * args[0].element_size()
            kind = name.removesuffix("_into_tensor").removesuffix("_tensor")
            self.traffic.add(kind, nbytes * (self.group_size if kind == "all_gather" else 1),
                             self.group_size)
        return func(*args, **(kwargs or {}))


def local_part(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (or an async collective's) local tensor; a plain tensor as it is."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.wait() if hasattr(t, "wait") else t


def check_against_dense(name: str, model: nn.Module, x: torch.Tensor, dense: MLP,
                        full_x: torch.Tensor, sequence_parallel: bool, tp: int, rank: int) -> None:
    """``model``'s output, input gradient and weight gradients on this rank against the dense
    MLP's (this rank's shards of them); the dense MLP has run its backward on ``full_x``."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y))
    ours_of = (lambda t: t.chunk(tp)[rank]) if sequence_parallel else (lambda t: t)
    terms = full_x.shape[0] * full_x.shape[1] + 5 * full_x.shape[2]  # tokens, then h and 4h
    pairs = {"output": (local_part(y), ours_of(dense(full_x).detach())),
             "input grad": (x.grad, ours_of(full_x.grad)),
             "up.weight grad": (local_part(model.up.weight.grad),
                                dense.up.weight.grad.chunk(tp, 0)[rank]),
             "up.bias grad": (local_part(model.up.bias.grad), dense.up.bias.grad.chunk(tp)[rank]),
             "down.weight grad": (local_part(model.down.weight.grad),
                                  dense.down.weight.grad.chunk(tp, 1)[rank])}
    for what, (actual, expected) in pairs.items():
        assert_close(actual, expected, name=f"{name} (tp={tp}, sp={sequence_parallel}) {what} vs "
                                            "the dense MLP's", terms=terms)
    model.zero_grad(set_to_none=True)


def measure(tp: int, sequence_parallel: bool, seq: int, batch: int, hidden: int,
            repeats: int, warmup: int, with_peer: bool) -> dict:
    """On one rank: check ours (and the peer) against the dense MLP, count what one step
    communicates, then time the steps, taking turns."""
    state = mpu.initialize(tp=tp)
    rank = state.tp.rank
    torch.manual_seed(0)
    dense = MLP(hidden)
    full_x = torch.randn(seq, batch, hidden, generator=torch.Generator().manual_seed(1),
                         requires_grad=True)
    dense(full_x).backward(torch.ones(seq, batch, hidden))
    x = (full_x.detach().chunk(tp)[rank] if sequence_parallel else full_x.detach()).clone()
    x.requires_grad_()
    models = {"ours": OurMLP(dense, sequence_parallel)}
    if with_peer:
        models[PEER] = torch_mlp(dense, sequence_parallel, state.tp.group)
    for name, model in models.items():
        check_against_dense(name, model, x, dense, full_x, sequence_parallel, tp, rank)

    steps = {name: (lambda m=model: m(x).backward(torch.ones_like(x))) for name, model in
             models.items()}
    traffic = {}
    with comm.count_traffic() as traffic["ours"]:
        steps["ours"]()
    if with_peer:
        with FunctionalCollectives(tp) as counted:
            steps[PEER]()
        traffic[PEER] = counted.traffic
    seconds = time_alternating(steps, repeats=repeats, warmup=warmup, group=state.tp.group)
    return {name: {"seconds": seconds[name], "wire_bytes": traffic[name].wire,
                   "calls": dict(traffic[name].calls)} for name in models}


def theoretical_wire_bytes(tp: int, seq: int, batch: int, hidden: int, elem: int,
                           sequence_parallel: bool = False) -> float:
    """What Megatron's algorithm puts on a ring per rank, in units of (tp-1)/tp·[s, b, h]: two
    all-reduces (forward, backward) of two units each (a reduce-scatter and an all-gather), and
    under sequence parallelism a fifth, the column layer's input gathered again in backward
    (only this rank's tokens are kept)."""
    units = 5 if sequence_parallel else 4
    return units * (tp - 1) / tp * seq * batch * hidden * elem


def run(seq: int, batch: int, hidden: int, max_tp: int, repeats: int,
        warmup: int) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for tp in (t for t in (1, 2, 4, 8) if t <= max_tp):
        world = LocalWorld(tp)
        try:
            for sequence_parallel in (False, True):
                args = (tp, sequence_parallel, seq, batch, hidden, repeats, warmup)
                try:
                    results = world.run(measure, *args, tp > 1, timeout=600)
                except RankFailure as failure:
                    if tp == 1:
                        raise
                    notes.append(f"tp={tp} sp={sequence_parallel}: torch's DTensor MLP could not "
                                 f"run or disagreed with the dense MLP, so it has no row:\n"
                                 f"{failure}")
                    world = LocalWorld(tp)  # the failed world was torn down
                    results = world.run(measure, *args, False, timeout=600)
                rows += _rows(tp, sequence_parallel, results, seq, batch, hidden)
        finally:
            world.close()
    for row in rows:
        base = next(r for r in rows if r["tp"] == 1 and r["sp"] == row["sp"])
        row["speedup_vs_tp1"] = base["median_ms"] / row["median_ms"]
    return rows, notes


def _rows(tp: int, sequence_parallel: bool, results: list[dict], seq: int, batch: int,
          hidden: int) -> list[dict]:
    theory = theoretical_wire_bytes(tp, seq, batch, hidden, elem=4,
                                    sequence_parallel=sequence_parallel)
    steps = {name: slowest_per_step([r[name]["seconds"] for r in results]) for name in results[0]}
    rows = []
    for name, result in results[0].items():
        rows.append({"tp": tp, "sp": sequence_parallel, "variant": name, "tokens": seq * batch,
                     "hidden": hidden, **summarize(steps[name]),
                     "ours/peer": paired_ratio(steps["ours"], steps[PEER])
                     if name == "ours" and PEER in steps else None,
                     # per rank: up and down, 2·T·h·4h/tp each forward, twice that back
                     "flops": 48 * seq * batch * hidden**2 / tp, "dtype": "float32",
                     "sent_MB": result["wire_bytes"] / 1e6, "theory_MB": theory / 1e6,
                     "sent/theory": result["wire_bytes"] / theory if theory else 1.0,
                     "collectives": ",".join(f"{k}x{v}" for k, v in
                                             sorted(result["calls"].items())) or "-"})
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
    rows, notes = run(args.seq, args.batch, args.hidden, args.max_tp, args.repeats, args.warmup)
    notes += [
        f"{PEER} = torch.distributed.tensor.parallel.parallelize_module, ColwiseParallel → "
        "RowwiseParallel (sp: input_layouts=Shard(0) / output_layouts=Shard(0)), tp > 1 only; "
        "its output, input gradient and weight gradients equal the dense MLP's (checked before "
        "timing, float32 tolerance)",
        "ours/peer = median over steps of our step time / the peer's step next to it; a step "
        "ends when its slowest rank does",
        "theory_MB counts Megatron's re-gather of the column layer's input in backward under "
        "sequence parallelism; DTensor keeps the gathered input instead (4 units, not 5: "
        "sent/theory 0.8, for s·b·h more activation memory per rank)",
    ]
    return Report("tp_layers", rows, COLUMNS, ["tp", "sp", "variant", "tokens", "hidden"],
                  {**vars(args), "backend": "gloo", "dtype": "float32",
                   "note": "tp CPU processes, one thread each, share the machine's cores"}, notes)


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
