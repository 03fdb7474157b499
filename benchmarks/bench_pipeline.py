"""Pipeline schedules on CPU gloo: step time, measured idle per rank next to the simulated one,
and torch.distributed.pipelining (Schedule1F1B, ScheduleInterleaved1F1B) on the same model and data.

For pp in {2, 4} (pp gloo processes, one thread each, on this machine's cores), a TinyLM of
``--layers`` blocks is split into pp stages (2 chunks per rank for the interleaved schedules) and
one training step over ``--microbatches`` micro-batches is timed (median over repeats of the
slowest rank, ranks started together by a barrier). Per rank:

    idle      1 - (time in F/B/W) / step time, measured from the executor's per-action timings
    sim idle  the simulator's idle share for the same schedule under each rank's measured median
              F, B, W times and the measured time of one message (ping-pong between ranks 0
              and 1): what the schedule, the stages' imbalance and the messages explain

torch.distributed.pipelining runs the same chunks (wrapped to take batch-first inputs, since it
splits the batch along dim 0) from the same initial weights on the same data: ``loss`` must
match ours, and ``ours/torch`` is the median of our step time over theirs, the two alternating
step by step in the same processes so that both see the same load on a shared machine.

    python -m benchmarks.bench_pipeline [--pps 2 4 --layers 8 --hidden 256 --seq 64 --batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from benchmarks._harness import Report, publish, summarize
from parallelkit import mpu
from parallelkit.distributed.p2p import PipelineP2P, Recv, Send
from parallelkit.launch import LocalWorld, RankFailure
from parallelkit.pipeline_parallel import (Costs, PipelineStage, build_schedule, simulate,
                                           stage_chunks, train_step)
from parallelkit.models.tinylm import TinyConfig, TinyLM

OURS = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"]
QUICK = ["--hidden", "64", "--seq", "16", "--batch", "8", "--microbatches", "4", "--repeats", "3"]
COLUMNS = [("pp", "d"), ("schedule", ""), ("median_ms", ".1f"), ("iqr_ms", ".1f"),
           ("p2p_ms", ".2f"), ("idle", ""), ("sim_idle", ""), ("loss", ".6f"),
           ("loss_diff", ".1e"), ("ours/torch", ".2f")]
TORCH_PEERS = {"1f1b": "torch Schedule1F1B", "interleaved-1f1b": "torch ScheduleInterleaved1F1B"}


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(config: TinyConfig, v: int):
    """The model (seed 0, same on every rank), this rank's chunks, and the data (seed 1)."""
    torch.manual_seed(0)
    model = TinyLM(config)
    pp, rank = mpu.get_pp_world_size(), mpu.get_pp_rank()
    chunks = stage_chunks(model.blocks, rank, pp, v, pre=model.embed,
                          post=nn.Sequential(model.ln_f, model.lm_head))
    return model, chunks


def data(config: TinyConfig, seq: int, batch: int):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, config.vocab, (seq, batch), generator=g),
            torch.randint(0, config.vocab, (seq, batch), generator=g))


def our_runner(schedule: str, config: TinyConfig, seq: int, batch: int, m: int):
    """One step of our schedule on this rank: ``step(timings) -> loss``."""
    model, _ = build(config, 2 if schedule == "interleaved-1f1b" else 1)
    stage = PipelineStage.from_layers(model.blocks, lm_loss, pre=model.embed,
                                      post=nn.Sequential(model.ln_f, model.lm_head))
    ids, targets = data(config, seq, batch)

    def step(timings: list) -> float:
        for p in stage.parameters():
            p.grad = None
        return train_step(schedule, stage, ids, targets, m, (seq, batch // m, config.hidden),
                          timings).item()
    return step


class _BatchFirst(nn.Module):
    """torch.distributed.pipelining splits inputs and targets along dim 0: give the first chunk
    ``[b, s]`` ids and have the last return ``[b, s, vocab]``; inside, the chunk is unchanged."""

    def __init__(self, chunk: nn.Module, first: bool, last: bool):
        super().__init__()
        self.chunk, self.first, self.last = chunk, first, last

    def forward(self, x):
        y = self.chunk(x.t() if self.first else x)
        return y.transpose(0, 1) if self.last else y


def torch_runner(schedule: str, config: TinyConfig, seq: int, batch: int, m: int):
    """The same chunks, weights and data under torch.distributed.pipelining."""
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import Schedule1F1B, ScheduleInterleaved1F1B

    v = 2 if schedule == "interleaved-1f1b" else 1
    pp, rank, group = mpu.get_pp_world_size(), mpu.get_pp_rank(), mpu.get_pp_group()
    _, chunks = build(config, v)
    last = pp * v - 1
    stages = [TorchStage(_BatchFirst(chunk, s == 0, s == last), s, pp * v, torch.device("cpu"),
                         group=group)
              for chunk, s in ((chunk, c * pp + rank) for c, chunk in enumerate(chunks))]
    runner = (Schedule1F1B(stages[0], m, loss_fn=lm_loss) if v == 1
              else ScheduleInterleaved1F1B(stages, m, loss_fn=lm_loss))
    ids, targets = (t.t().contiguous() for t in data(config, seq, batch))

    def step(timings: list) -> float:
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        losses = []
        runner.step(*((ids,) if rank == 0 else ()),
                    **({"target": targets, "losses": losses} if rank == pp - 1 else {}))
        return torch.stack(losses).mean().item() if losses else float("nan")
    return step


def message_time(shape: tuple[int, ...], repeats: int = 21) -> float:
    """One-way time of one activation message between pipeline ranks 0 and 1: the median
    ping-pong round trip / 2 (the median, because other processes share the cores)."""
    p2p, x = PipelineP2P(mpu.get_pp_group()), torch.randn(shape)
    there, back = [Send(1, x)], [Recv(1, shape, x.dtype)]
    if p2p.rank == 1:
        there, back = [Recv(0, shape, x.dtype)], [Send(0, x)]
    round_trips = [0.0]
    dist.barrier()
    if p2p.rank < 2:
        for _ in range(repeats):
            start = time.perf_counter()
            p2p.exchange(there)
            p2p.exchange(back)
            round_trips.append(time.perf_counter() - start)
    p2p.finish()
    return statistics.median(round_trips[1:] or round_trips) / 2


def measure(schedule: str, with_torch: bool, config: TinyConfig, seq: int, batch: int, m: int,
            repeats: int, warmup: int) -> dict:
    """On one rank: time our step and, alternating with it, torch's (so that both see the same
    load on a shared machine); our idle share and mean F/B/W times from the executor's timings."""
    v = 2 if schedule == "interleaved-1f1b" else 1
    mpu.initialize(pp=dist.get_world_size(), virtual_pp=v if v > 1 else None)
    p2p_seconds = message_time((seq, batch // m, config.hidden))
    runners = {"ours": our_runner(schedule, config, seq, batch, m)}
    if with_torch:
        runners["torch"] = torch_runner(schedule, config, seq, batch, m)
    seconds = {name: [] for name in runners}
    losses, idle, costs = {}, [], {"F": [], "B": [], "W": []}
    for step in range(warmup + repeats):
        for name, run in runners.items():
            timings = []
            dist.barrier()  # ranks start together; waiting for a peer is part of the step
            start = time.perf_counter()
            losses[name] = run(timings)
            elapsed = time.perf_counter() - start
            if step < warmup:
                continue
            seconds[name].append(elapsed)
            computing = 0.0
            for actions, t0, t1 in timings:  # empty for torch's runner
                if not actions[0].is_comm:
                    computing += t1 - t0
                    costs[actions[0].kind].append(t1 - t0)
            if name == "ours":
                idle.append(1 - computing / elapsed)
    return {"seconds": seconds, "loss": losses, "idle": statistics.median(idle), "p2p": p2p_seconds,
            "costs": {k: statistics.median(v) if v else 0.0 for k, v in costs.items()}}


def run(args) -> list[dict]:
    config = TinyConfig(vocab=args.vocab, hidden=args.hidden, heads=args.heads, ffn=4 * args.hidden,
                        layers=args.layers)
    common = (config, args.seq, args.batch, args.microbatches, args.repeats, args.warmup)
    rows = []
    for pp in args.pps:
        world = LocalWorld(pp)
        try:
            for name in OURS:
                with_torch, note = name in TORCH_PEERS, None
                try:
                    results = world.run(measure, name, with_torch, *common, timeout=600)
                except RankFailure as failure:
                    if not with_torch:
                        raise
                    note = f"torch.distributed.pipelining could not run {name}:\n{failure}"
                    world = LocalWorld(pp)  # the failed world was torn down
                    results = world.run(measure, name, False, *common, timeout=600)
                rows += _rows(pp, name, results, args.microbatches, note)
        finally:
            world.close()
    return rows


def _rows(pp: int, name: str, results: list[dict], m: int, note: str | None) -> list[dict]:
    def slowest(runner):  # a step ends when its slowest rank does (they started together)
        per_rank = [r["seconds"][runner] for r in results]
        return [max(times) for times in zip(*per_rank)]

    def loss(runner):  # the last stage's
        return next(r["loss"][runner] for r in results[::-1] if r["loss"][runner] == r["loss"][runner])

    v = 2 if name == "interleaved-1f1b" else 1
    # each rank's median action times and the median message time; without W actions the
    # measured B is a full backward, which Costs(backward=B, weight=0) says
    p2p = results[0]["p2p"]
    sim = simulate(build_schedule(name, pp, m, v),
                   [Costs(r["costs"]["F"], r["costs"]["B"], r["costs"]["W"], p2p) for r in results])
    ours = {"pp": pp, "schedule": name, "m": m, **summarize(slowest("ours")), "loss": loss("ours"),
            "idle": " ".join(f"{r['idle']:.2f}" for r in results),
            "sim_idle": " ".join(f"{x / sim.makespan:.2f}" for x in sim.idle),
            "idle_mean": statistics.mean(r["idle"] for r in results),
            "sim_idle_mean": sim.bubble_fraction, "p2p_ms": p2p * 1e3,
            **{f"{k}_ms": [round(r["costs"][k] * 1e3, 2) for r in results] for k in "FBW"}}
    if note:
        ours["note"] = note
    if "torch" not in results[0]["seconds"]:
        return [ours]
    theirs = {"pp": pp, "schedule": TORCH_PEERS[name], "m": m, **summarize(slowest("torch")),
              "loss": loss("torch")}
    ours["loss_diff"] = abs(ours["loss"] - theirs["loss"])
    # paired: each of our steps against torch's step right after it, then the median
    ours["ours/torch"] = statistics.median(a / b for a, b in zip(slowest("ours"), slowest("torch")))
    return [ours, theirs]


def model_flops(config: TinyConfig, seq: int, batch: int) -> float:
    """Matmul FLOPs of one training step of the whole model (3x the forward's: the backward
    computes input and weight gradients): per block 24·T·h² (q, k, v, o and the 4h MLP) plus
    4·b·s²·h of attention, and 2·T·h·vocab for the head, T = s·b tokens."""
    tokens, h = seq * batch, config.hidden
    block = 2 * tokens * (4 * h * h + 2 * h * config.ffn) + 4 * batch * seq * seq * h
    return 3 * (config.layers * block + 2 * tokens * h * config.vocab)


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # other processes on the machine skew CPU timings
    rows = run(args)
    config = TinyConfig(vocab=args.vocab, hidden=args.hidden, heads=args.heads,
                        ffn=4 * args.hidden, layers=args.layers)
    for row in rows:  # per rank and per timed step, for publish's achieved rate and %peak
        row.update(flops=model_flops(config, args.seq, args.batch) / row["pp"], dtype="float32")
    load = [load_before, os.getloadavg()[0]]
    notes = [row.pop("note") for row in rows if "note" in row]
    notes.append(f"load average (1 min) before/after: {load[0]:.1f} / {load[1]:.1f} on "
                 f"{os.cpu_count()} cores; with pp > cores, ranks share cores and idle time is "
                 "partly used by other ranks")
    return Report("pipeline", rows, COLUMNS, ["pp", "schedule"],
                  {**vars(args), "backend": "gloo", "dtype": "float32",
                   "load_average_before_after": load,
                   "note": "pp CPU processes, one thread each, share the machine's cores; "
                           "idle = 1 - compute/step"}, notes)


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
