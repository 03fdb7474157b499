"""Data parallelism on dp local gloo ranks: bytes per step vs the ring minimum, and the time of a
training step with the gradient collectives overlapped or after backward, next to torch's
DistributedDataParallel and ZeroRedundancyOptimizer on the same model, data and bucket size.

The model is a stack of ``Linear(h, h) + GELU`` layers in fp32 (about ``layers * h²`` parameters),
the loss a mean of squares, the optimizer SGD with lr 0 (the weights stay put, the work is done).
Variants, each on its own copy of the model:

- ``local (no comm)``: forward + backward + step alone, the floor the others are measured against;
- ``torch DDP``: ``torch.nn.parallel.DistributedDataParallel``, overlapped, same bucket size
  (its bytes are counted by a comm hook around its default all-reduce);
- ``pk overlap``: ``DistributedDataParallel``, each bucket's all-reduce started from backward;
- ``pk after-backward``: the same with ``overlap_grad_reduce=False``: all buckets in finish;
- ``pk ZeRO-1``: reduce-scatter in backward, the optimizer step on this rank's shard, then an
  all-gather of the updated parameters;
- ``torch ZeRO-1``: torch's DDP (all-reduce in backward) with ``ZeroRedundancyOptimizer``
  (``parameters_as_bucket_view=True``): the step on this rank's parameters, then a broadcast of
  each rank's (its broadcasts are counted, each as (p-1)/p of its payload, a ring's share).

Before anything is timed, every variant that communicates takes one step with an optimizer that
sets each parameter to its gradient: afterwards every parameter must equal the full batch's
averaged gradient computed in one process (float32 tolerance). Then the variants take turns step
by step; a step ends when its slowest rank does (ranks start together after a barrier).
``ours/peer``: the median over steps of our step time over the peer's next to it (torch DDP for
pk overlap and after-backward, torch ZeRO-1 for pk ZeRO-1).

Bytes are those each rank sends in one step, counted from the collectives actually issued, over a
ring: an all-reduce of n bytes costs ``2 (p-1)/p · n``, a reduce-scatter plus an all-gather the
same; ``n`` is the model's gradient bytes, so a ratio above 1 is padding or extra traffic.
``hidden`` is the share of the after-backward variant's communication time that overlapping
removed: ``(t_after - t) / (t_after - t_local)``.

    python -m benchmarks.bench_data_parallel [--dp 2 --layers 8 --hidden 1024 --tokens 128]
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from benchmarks._harness import (Report, paired_ratio, publish, slowest_per_step, summarize,
                                 time_alternating)
from parallelkit.data_parallel import DistributedDataParallel, DistributedOptimizer
from parallelkit.distributed import comm
from parallelkit.launch import LocalWorld
from parallelkit.testing.tolerances import assert_close

PEER_OF = {"pk overlap": "torch DDP", "pk after-backward": "torch DDP",
           "pk ZeRO-1": "torch ZeRO-1"}
VARIANTS = ("local (no comm)", "torch DDP", "pk overlap", "pk after-backward", "pk ZeRO-1",
            "torch ZeRO-1")


class MLPStack(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x):  # x: [tokens, hidden]
        for layer in self.layers:
            x = F.gelu(layer(x))
        return x


class GradientAsParameter(torch.optim.Optimizer):
    """The check's optimizer: ``step`` sets every parameter to its gradient, so that after one
    step a parameter holds exactly the gradient its update was given, wherever the update ran
    (this rank, or the rank owning its shard, then gathered or broadcast)."""

    def __init__(self, params, lr: float = 0.0):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.copy_(p.grad)


def _counting_allreduce_hook(group, bucket):
    """torch DDP's default all-reduce, counted like parallelkit's collectives."""
    comm.record_traffic("all_reduce", bucket.buffer().numel() * bucket.buffer().element_size(),
                        group)
    return default_hooks.allreduce_hook(group, bucket)


@contextlib.contextmanager
def counting_broadcasts():
    """Count ``dist.broadcast`` (ZeroRedundancyOptimizer's parameter sync) like comm's
    collectives."""
    original = dist.broadcast

    def broadcast(tensor, *args, **kwargs):
        group = kwargs.get("group") or dist.group.WORLD
        comm.record_traffic("broadcast", tensor.numel() * tensor.element_size(), group)
        return original(tensor, *args, **kwargs)

    dist.broadcast = broadcast
    try:
        yield
    finally:
        dist.broadcast = original


def _build(variant: str, base: nn.Module, bucket_bytes: int, optimizer_cls, **options):
    """(model to call, function that finishes the gradient sync, optimizer)."""
    module = copy.deepcopy(base)
    if variant == "local (no comm)":
        return module, lambda: None, optimizer_cls(module.parameters(), **options)
    if variant.startswith("torch"):
        model = TorchDDP(module, bucket_cap_mb=bucket_bytes / 2**20)
        model.register_comm_hook(dist.group.WORLD, _counting_allreduce_hook)
        optimizer = (ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_cls,
                                             parameters_as_bucket_view=True, **options)
                     if variant == "torch ZeRO-1" else
                     optimizer_cls(model.parameters(), **options))
        return model, lambda: None, optimizer  # its backward waits for the last bucket itself
    model = DistributedDataParallel(module, dist.group.WORLD, bucket_bytes=bucket_bytes,
                                    overlap_grad_reduce=variant != "pk after-backward",
                                    use_distributed_optimizer=variant == "pk ZeRO-1")
    optimizer = (DistributedOptimizer(model, optimizer_cls, **options) if variant == "pk ZeRO-1"
                 else optimizer_cls(model.parameters(), **options))
    return model, model.finish_grad_sync, optimizer


def training_step(built, x: torch.Tensor) -> None:
    model, finish, optimizer = built
    model.zero_grad()
    model(x).pow(2).mean().backward()
    finish()
    optimizer.step()


def check_against_dense(base: nn.Module, xs: list[torch.Tensor], bucket_bytes: int) -> None:
    """One step of every communicating variant with GradientAsParameter: each parameter must
    then equal the full batch's gradient (the mean of the ranks' losses) computed here."""
    dense = copy.deepcopy(base)
    (sum(dense(x).pow(2).mean() for x in xs) / len(xs)).backward()
    expected = {name: p.grad for name, p in dense.named_parameters()}
    rank, tokens = dist.get_rank(), sum(x.shape[0] for x in xs)
    terms = tokens + len(base.layers) * base.layers[0].in_features
    for variant in VARIANTS[1:]:
        built = _build(variant, base, bucket_bytes, GradientAsParameter)
        training_step(built, xs[rank])
        for name, p in built[0].module.named_parameters():
            assert_close(p.detach(), expected[name], terms=terms,
                         name=f"{variant}: {name} after one step that sets it to its gradient, "
                              "vs the full batch's gradient")


def measure(hidden: int, layers: int, tokens: int, bucket_bytes: int, repeats: int,
            warmup: int) -> dict:
    """On one rank: the check, then per variant the bytes of a step and the steps' times."""
    torch.manual_seed(0)
    base = MLPStack(hidden, layers)
    xs = [torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(r))
          for r in range(dist.get_world_size())]
    x = xs[dist.get_rank()]
    check_against_dense(base, xs, bucket_bytes)
    built = {variant: _build(variant, base, bucket_bytes, torch.optim.SGD, lr=0.0)
             for variant in VARIANTS}
    traffic = {}
    for variant in VARIANTS:
        training_step(built[variant], x)  # torch DDP rebuilds its buckets after a first step
        with comm.count_traffic() as traffic[variant], counting_broadcasts():
            training_step(built[variant], x)
    steps = {variant: (lambda b=b: training_step(b, x)) for variant, b in built.items()}
    seconds = time_alternating(steps, repeats=repeats, warmup=warmup, group=dist.group.WORLD)
    return {variant: {"seconds": seconds[variant], "wire_bytes": traffic[variant].wire,
                      "calls": dict(traffic[variant].calls)} for variant in VARIANTS}


def run(dp: int, hidden: int, layers: int, tokens: int, bucket_mb: float, repeats: int,
        warmup: int) -> list[dict]:
    bucket_bytes = int(bucket_mb * 2**20)
    with LocalWorld(dp) as world:
        results = world.run(measure, hidden, layers, tokens, bucket_bytes, repeats, warmup,
                            timeout=600)
    grad_bytes = layers * (hidden * hidden + hidden) * 4
    theory = 2 * (dp - 1) / dp * grad_bytes
    steps = {v: slowest_per_step([r[v]["seconds"] for r in results]) for v in VARIANTS}
    times = {v: summarize(steps[v]) for v in VARIANTS}
    local, after = times["local (no comm)"]["median_ms"], times["pk after-backward"]["median_ms"]
    rows = []
    for variant, result in results[0].items():
        median = times[variant]["median_ms"]
        communicates = variant != "local (no comm)"
        rows.append({
            "variant": variant, "dp": dp, "grad_MB": grad_bytes / 1e6, **times[variant],
            "ours/peer": paired_ratio(steps[variant], steps[PEER_OF[variant]])
            if variant in PEER_OF else None,
            "hidden": (after - median) / (after - local) if communicates and after > local else 0.0,
            "sent_MB": result["wire_bytes"] / 1e6,
            "theory_MB": theory / 1e6 if communicates else 0.0,
            "sent/theory": result["wire_bytes"] / theory if communicates else 0.0,
            "collectives": ",".join(f"{k}x{v}" for k, v in sorted(result["calls"].items())) or "-",
        })
    return rows


QUICK = ["--hidden", "256", "--layers", "4", "--tokens", "64", "--bucket-mb", "0.25",
         "--repeats", "5"]
COLUMNS = [("variant", ""), ("dp", "d"), ("grad_MB", ".1f"), ("median_ms", ".1f"),
           ("iqr_ms", ".1f"), ("ours/peer", ".2f"), ("hidden", ".0%"), ("sent_MB", ".2f"),
           ("theory_MB", ".2f"), ("sent/theory", ".3f"), ("collectives", "")]


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, default=2, help="local gloo ranks")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--bucket-mb", type=float, default=4.0,
                        help="bucket size in MiB; smaller than the 25 MiB default so that this "
                             "34 MB model spans several buckets, as a large model spans many")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    rows = run(args.dp, args.hidden, args.layers, args.tokens, args.bucket_mb, args.repeats,
               args.warmup)
    notes = [
        "every communicating variant's parameters, after one step that sets each to its "
        "gradient, equal the full batch's gradient (checked before timing, float32 tolerance)",
        "ours/peer = median over steps of our step time / the peer's step next to it: "
        + ", ".join(f"{ours} vs {peer}" for ours, peer in PEER_OF.items()),
        "torch ZeRO-1 = torch DDP (all-reduce) + ZeroRedundancyOptimizer(SGD, "
        "parameters_as_bucket_view=True), whose step broadcasts each rank's parameters: "
        "3 (p-1)/p of the gradient bytes per step where reduce-scatter + all-gather need 2",
    ]
    return Report("data_parallel", rows, COLUMNS, ["variant"], {
        **vars(args), "backend": "gloo", "dtype": "float32", "optimizer": "SGD lr=0",
        "timed": "forward + backward + gradient sync + optimizer step; a step ends when its "
                 "slowest rank does; bytes: one whole step (rank 0)",
        "note": "dp CPU processes, one compute thread each, share the machine's cores with "
                "gloo's communication threads"}, notes)


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
