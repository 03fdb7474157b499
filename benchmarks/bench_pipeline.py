"""Pipeline schedules on CPU gloo: step time, measured idle per rank next to the simulated one,
and torch.distributed.pipelining's schedule of each on the same model and data.

For pp in {2, 4} (pp gloo processes, one thread each, on this machine's cores), a TinyLM of
``--layers`` blocks is split into pp stages (2 chunks per rank for the interleaved schedules) and
one training step over ``--microbatches`` micro-batches is timed (median over repeats of the
slowest rank, ranks started together by a barrier). Per rank:

    idle      1 - (time in F/B/W) / step time, measured from the executor's per-action timings
    sim idle  the simulator's idle share for the same schedule under each rank's measured median
              F, B, W times and the measured time of one message (ping-pong between ranks 0
              and 1): what the schedule, the stages' imbalance and the messages explain

torch.distributed.pipelining (``PipelineStage`` and the peer schedule: ScheduleGPipe, Schedule1F1B,
ScheduleInterleaved1F1B, and for zb-h1 ScheduleInterleavedZeroBubble with one stage per rank,
which is ZB-H1: 1F1B with the weight gradients deferred) runs the same chunks (wrapped to take
batch-first inputs, since it splits the batch along dim 0) from the same initial weights on the
same data. Before anything is timed, one step of each must give the same loss and the same
gradients on every rank (float32 tolerance). ``ours/peer`` is the median over steps of our step
time over theirs, the two alternating step by step in the same processes so that both see the
same load on a shared machine.

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

from benchmarks._harness import (Report, paired_ratio, publish, slowest_per_step, summarize,
                                 time_alternating)
from parallelkit import mpu
from parallelkit.distributed.p2p import PipelineP2P, Recv, Send
from parallelkit.launch import LocalWorld, RankFailure
from parallelkit.pipeline_parallel import (Costs, PipelineStage, build_schedule, simulate,
                                           stage_chunks, train_step)
from parallelkit.models.tinylm import TinyConfig, TinyLM
from parallelkit.testing.tolerances import assert_close, transformer_terms

OURS = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"]
QUICK = ["--hidden", "64", "--seq", "16", "--batch", "8", "--microbatches", "4", "--repeats", "3"]
COLUMNS = [("pp", "d"), ("schedule", ""), ("median_ms", ".1f"), ("iqr_ms", ".1f"),
           ("p2p_ms", ".2f"), ("idle", ""), ("sim_idle", ""), ("loss", ".6f"),
           ("loss_diff", ".1e"), ("ours/peer", ".2f")]
TORCH_PEERS = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
               "interleaved-1f1b": "ScheduleInterleaved1F1B",
               "zb-h1": "ScheduleInterleavedZeroBubble"}


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
    """One step of our schedule on this rank: ``step(timings) -> loss``, and this rank's
    parameters."""
    model, _ = build(config, 2 if schedule == "interleaved-1f1b" else 1)
    stage = PipelineStage.from_layers(model.blocks, lm_loss, pre=model.embed,
                                      post=nn.Sequential(model.ln_f, model.lm_head))
    ids, targets = data(config, seq, batch)

    def step(timings: list) -> float:
        for p in stage.parameters():
            p.grad = None
        return train_step(schedule, stage, ids, targets, m, (seq, batch // m, config.hidden),
                          timings).item()
    return step, list(stage.parameters())


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
    """The same chunks, weights and data under torch.distributed.pipelining: ``step(timings)
    -> loss`` (the last rank's; NaN on the others), and this rank's parameters."""
    from torch.distributed import pipelining
    from torch.distributed.pipelining import PipelineStage as TorchStage

    v = 2 if schedule == "interleaved-1f1b" else 1
    pp, rank, group = mpu.get_pp_world_size(), mpu.get_pp_rank(), mpu.get_pp_group()
    _, chunks = build(config, v)
    last = pp * v - 1
    stages = [TorchStage(_BatchFirst(chunk, s == 0, s == last), s, pp * v, torch.device("cpu"),
                         group=group)
              for chunk, s in ((chunk, c * pp + rank) for c, chunk in enumerate(chunks))]
    peer = getattr(pipelining, TORCH_PEERS[schedule])
    multi = issubclass(peer, pipelining.schedules.PipelineScheduleMulti)  # takes a list of stages
    runner = peer(stages if multi else stages[0], m, loss_fn=lm_loss)
    ids, targets = (t.t().contiguous() for t in data(config, seq, batch))

    def step(timings: list) -> float:
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        losses = []
        runner.step(*((ids,) if rank == 0 else ()),
                    **({"target": targets, "losses": losses} if rank == pp - 1 else {}))
        return torch.stack(losses).mean().item() if losses else float("nan")
    return step, [p for chunk in chunks for p in chunk.parameters()]


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


def check_peer(runners: dict, config: TinyConfig, seq: int, batch: int) -> None:
    """One step of ours and one of torch's: the same loss (the last rank's) and the same gradient
    of every parameter of this rank, else raise (so that no unequal peer is timed)."""
    (ours, our_params), (theirs, their_params) = runners["ours"], runners["torch"]
    loss, their_loss = ours([]), theirs([])
    terms = transformer_terms(seq * batch, seq, config.hidden, config.ffn, config.vocab,
                              config.layers)
    if their_loss == their_loss:  # not NaN: the last rank
        assert_close(torch.tensor(their_loss), torch.tensor(loss), terms=terms,
                     name="torch.distributed.pipelining's loss vs ours")
    if len(their_params) != len(our_params):
        raise ValueError(f"torch's stages hold {len(their_params)} parameters on this rank, "
                         f"ours {len(our_params)}: the two pipelines split the model differently")
    for i, (theirs_p, ours_p) in enumerate(zip(their_params, our_params)):
        assert_close(theirs_p.grad, ours_p.grad, terms=terms,
                     name=f"torch.distributed.pipelining's gradient of parameter {i} "
                          f"{tuple(ours_p.shape)} vs ours")


def measure(schedule: str, with_torch: bool, config: TinyConfig, seq: int, batch: int, m: int,
            repeats: int, warmup: int) -> dict:
    """On one rank: check torch's step against ours, then time our step and, alternating with
    it, torch's; our idle share and median F/B/W times from the executor's timings."""
    v = 2 if schedule == "interleaved-1f1b" else 1
    mpu.initialize(pp=dist.get_world_size(), virtual_pp=v if v > 1 else None)
    p2p_seconds = message_time((seq, batch // m, config.hidden))
    runners = {"ours": our_runner(schedule, config, seq, batch, m)}
    if with_torch:
        runners["torch"] = torch_runner(schedule, config, seq, batch, m)
        check_peer(runners, config, seq, batch)
    losses, timings = {}, []

    def step(name):
        timings.append([])
        losses[name] = runners[name][0](timings[-1])  # torch's runner records no timings

    seconds = time_alternating({name: (lambda n=name: step(n)) for name in runners},
                               repeats=repeats, warmup=warmup, group=dist.group.WORLD)
    ours_timed = timings[warmup * len(runners)::len(runners)]  # ours goes first in a round
    idle, costs = [], {"F": [], "B": [], "W": []}
    for elapsed, actions_timed in zip(seconds["ours"], ours_timed):
        computing = 0.0
        for actions, t0, t1 in actions_timed:
            if not actions[0].is_comm:
                computing += t1 - t0
                costs[actions[0].kind].append(t1 - t0)
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
                    note = (f"pp={pp}: torch.distributed.pipelining's {TORCH_PEERS[name]} could "
                            f"not run {name} or disagreed with ours, so it has no row:\n{failure}")
                    world = LocalWorld(pp)  # the failed world was torn down
                    results = world.run(measure, name, False, *common, timeout=600)
                rows += _rows(pp, name, results, args.microbatches, note)
        finally:
            world.close()
    return rows


def _rows(pp: int, name: str, results: list[dict], m: int, note: str | None) -> list[dict]:
    def slowest(runner):  # a step ends when its slowest rank does (they started together)
        return slowest_per_step([r["seconds"][runner] for r in results])

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
    theirs = {"pp": pp, "schedule": f"torch {TORCH_PEERS[name]}", "m": m,
              **summarize(slowest("torch")), "loss": loss("torch")}
    ours["loss_diff"] = abs(ours["loss"] - theirs["loss"])
    ours["ours/peer"] = paired_ratio(slowest("ours"), slowest("torch"))
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
    notes.append("torch rows: torch.distributed.pipelining's PipelineStage + the named schedule on "
                 "the same chunks, weights and data (ScheduleInterleavedZeroBubble with one stage "
                 "per rank for zb-h1); its loss and every gradient equal ours (checked before "
                 "timing, float32 tolerance); ours/peer = median over steps of our step time / "
                 "torch's step next to it")
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
