"""Data parallelism on dp local gloo ranks: bytes per step vs the ring minimum, and the time of
forward + backward + gradient sync with the collectives overlapped or after backward, next to
torch's DistributedDataParallel on the same model, data and bucket size.

The model is a stack of ``Linear(h, h) + GELU`` layers in fp32 (about ``layers * h²`` parameters),
the loss a mean of squares. Variants, each on its own copy of the model:

- ``local (no comm)``: forward + backward alone, the floor the others are measured against;
- ``torch DDP``: ``torch.nn.parallel.DistributedDataParallel``, overlapped, same bucket size
  (its bytes are counted by a comm hook around its default all-reduce);
- ``pk overlap``: ``DistributedDataParallel``, each bucket's all-reduce started from backward;
- ``pk after-backward``: the same with ``overlap_grad_reduce=False``: all buckets in finish;
- ``pk ZeRO-1``: reduce-scatter in backward; its bytes also include the optimizer step's
  all-gather of the updated parameters (its time does not: that happens in ``step``).

Bytes are those each rank sends, counted from the collectives actually issued, over a ring:
an all-reduce of n bytes costs ``2 (p-1)/p · n``, a reduce-scatter plus an all-gather the same;
``n`` is the model's gradient bytes, so a ratio above 1 is padding or extra traffic.
``hidden`` is the share of the after-backward variant's communication time that overlapping
removed: ``(t_after - t) / (t_after - t_local)``.

    python -m benchmarks.bench_data_parallel [--dp 2 --layers 8 --hidden 1024 --tokens 128]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from benchmarks._harness import Report, publish, summarize
from parallelkit.data_parallel import DistributedDataParallel, DistributedOptimizer
from parallelkit.distributed import comm
from parallelkit.launch import LocalWorld

VARIANTS = ("local (no comm)", "torch DDP", "pk overlap", "pk after-backward", "pk ZeRO-1")


class MLPStack(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x):  # x: [tokens, hidden]
        for layer in self.layers:
            x = F.gelu(layer(x))
        return x


def _counting_allreduce_hook(group, bucket):
    """torch DDP's default all-reduce, counted like parallelkit's collectives."""
    comm.record_traffic("all_reduce", bucket.buffer().numel() * bucket.buffer().element_size(),
                        group)
    return default_hooks.allreduce_hook(group, bucket)


def _build(variant: str, base: nn.Module, bucket_bytes: int):
    """(model to call, function that finishes the gradient sync, optimizer step or None)."""
    module = copy.deepcopy(base)
    if variant == "local (no comm)":
        return module, lambda: None, None
    if variant == "torch DDP":
        model = TorchDDP(module, bucket_cap_mb=bucket_bytes / 2**20)
        model.register_comm_hook(dist.group.WORLD, _counting_allreduce_hook)
        return model, lambda: None, None  # its backward waits for the last bucket itself
    model = DistributedDataParallel(module, dist.group.WORLD, bucket_bytes=bucket_bytes,
                                    overlap_grad_reduce=variant != "pk after-backward",
                                    use_distributed_optimizer=variant == "pk ZeRO-1")
    step = None
    if variant == "pk ZeRO-1":
        step = DistributedOptimizer(model, torch.optim.SGD, lr=0.0).step  # lr 0: keep the model
    return model, model.finish_grad_sync, step


def measure(hidden: int, layers: int, tokens: int, bucket_bytes: int, repeats: int,
            warmup: int) -> dict:
    """On one rank: per variant, the times of forward + backward + sync and the bytes of a step."""
    torch.manual_seed(0)
    base = MLPStack(hidden, layers)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(dist.get_rank()))
    built = {variant: _build(variant, base, bucket_bytes) for variant in VARIANTS}

    def fwd_bwd_sync(variant):
        model, finish, _ = built[variant]
        model(x).pow(2).mean().backward()
        finish()

    traffic, seconds = {}, {variant: [] for variant in VARIANTS}
    # Round-robin over the variants, so that a busy moment on the shared cores slows all of them.
    for i in range(warmup + 1 + repeats):
        for variant, (model, _, step) in built.items():
            model.zero_grad()
            if i == warmup:  # one counted step, after torch DDP has rebuilt its buckets
                with comm.count_traffic() as traffic[variant]:
                    fwd_bwd_sync(variant)
                    if step is not None:
                        step()
                continue
            dist.barrier()  # start together, so a rank's time includes waiting for its peer
            start = time.perf_counter()
            fwd_bwd_sync(variant)
            if i > warmup:
                seconds[variant].append(time.perf_counter() - start)
    return {variant: {"seconds": seconds[variant], "wire_bytes": traffic[variant].wire,
                      "calls": dict(traffic[variant].calls)} for variant in VARIANTS}


def run(dp: int, hidden: int, layers: int, tokens: int, bucket_mb: float, repeats: int,
        warmup: int) -> list[dict]:
    bucket_bytes = int(bucket_mb * 2**20)
    with LocalWorld(dp) as world:
        results = world.run(measure, hidden, layers, tokens, bucket_bytes, repeats, warmup,
                            timeout=600)[0]
    grad_bytes = layers * (hidden * hidden + hidden) * 4
    theory = 2 * (dp - 1) / dp * grad_bytes
    times = {v: summarize(r["seconds"]) for v, r in results.items()}
    local, after = times["local (no comm)"]["median_ms"], times["pk after-backward"]["median_ms"]
    rows = []
    for variant, result in results.items():
        median = times[variant]["median_ms"]
        communicates = variant != "local (no comm)"
        rows.append({
            "variant": variant, "dp": dp, "grad_MB": grad_bytes / 1e6, **times[variant],
            "vs_torch_ddp": median / times["torch DDP"]["median_ms"],
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
           ("iqr_ms", ".1f"), ("vs_torch_ddp", ".2f"), ("hidden", ".0%"), ("sent_MB", ".2f"),
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
    return Report("data_parallel", rows, COLUMNS, ["variant"], {
        **vars(args), "backend": "gloo", "dtype": "float32",
        "timed": "forward + backward + gradient sync (rank 0); bytes: one whole step",
        "note": "dp CPU processes, one compute thread each, share the machine's cores with "
                "gloo's communication threads"})


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
