"""Mixture of experts under expert parallelism: the all-to-all's bytes against the volume the
routing implies, the load on each expert rank under a skewed router, and the local experts as
one grouped GEMM against an expert-by-expert loop.

``a2a``: an ``MoELayer`` (E experts, top-k, dropless, float32) on ep local gloo ranks, T tokens
each, one forward + backward, its all-to-all payload counted (``comm.count_traffic``). The
theoretical volume per rank is 4 · T · k · H · 4 bytes: every kept assignment's token goes out
and its output comes back, and backward does both again. ``off_rank`` is the share of the
assignments whose expert lives on another rank (what actually crosses the network), from the
routing itself; a uniform router gives 1 - 1/ep.

``load``: T · ep tokens routed by a router whose logits favour low-numbered experts (a bias of
``skew`` · (1 - e / E) on expert e); tokens received per EP rank as max/mean over the ranks:
dropless, with capacity factor 1.0 (dropped assignments counted), and after 50 updates of
DeepSeek-V3's expert bias (sigmoid router).

``gemm``: the local experts (E/ep of them, hidden H, intermediate I, float32) on T · k rows,
``torch._grouped_mm`` against the loop, timed in one process; ``loop/grouped`` is the ratio of
median times.

    python -m benchmarks.bench_moe [--ep 4 --experts 16 --top-k 2 --tokens 2048 --hidden 512]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

from benchmarks._harness import Report, publish, summarize, time_op
from parallelkit import mpu
from parallelkit.distributed import comm
from parallelkit.launch import LocalWorld
from parallelkit.moe import MoELayer, route, update_expert_bias
from parallelkit.moe.experts import ExpertParallelExperts
from parallelkit.moe.router import tokens_per_expert

QUICK = ["--ep", "2", "--experts", "8", "--tokens", "256", "--hidden", "64",
         "--intermediate", "128", "--repeats", "3"]
COLUMNS = [("part", ""), ("variant", ""), ("measured_MB", ".2f"), ("theory_MB", ".2f"),
           ("measured/theory", ".3f"), ("off_rank", ".3f"), ("max/mean", ".3f"),
           ("median_ms", ".2f"), ("iqr_ms", ".2f"), ("loop/grouped", ".2f")]


def measure_a2a(ep, experts, top_k, tokens, hidden, intermediate):
    """On one rank: all-to-all payload bytes of one forward + backward, and the share of its
    assignments routed off-rank."""
    mpu.initialize(ep=ep)
    torch.manual_seed(0)
    layer = MoELayer(hidden, intermediate, experts, top_k)
    for p in layer.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    with comm.count_traffic() as traffic:
        layer(x).sum().backward()
    index = layer.last_routing.index
    local = layer.experts.local_experts
    off = (torch.div(index, local, rounding_mode="floor") != dist.get_rank(layer.experts.ep_group))
    return {"bytes": traffic.payload["all_to_all"], "off_rank": off.float().mean().item()}


def load_balance(ep, experts, top_k, tokens, hidden, skew):
    """Tokens per EP rank, max/mean, for a skewed router: (dropless, capacity 1.0, bias)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens * ep, hidden, generator=g)
    weight = torch.randn(experts, hidden, generator=g) / hidden ** 0.5
    logits = x @ weight.t() + skew * (1 - torch.arange(experts) / experts)

    def per_rank(routing):
        counts = torch.bincount(routing.index.clamp(max=experts - 1).reshape(-1),
                                minlength=experts) if routing.index.numel() else None
        loads = counts.view(ep, -1).sum(1).float()
        return (loads.max() / loads.mean()).item()

    dropless = per_rank(route(logits, top_k))
    capped = route(logits, top_k, capacity_factor=1.0)
    kept = tokens_per_expert(capped, experts).view(ep, -1).sum(1).float()
    bias = torch.zeros(experts)
    for _ in range(50):
        update_expert_bias(bias, tokens_per_expert(route(logits, top_k, "sigmoid",
                                                         expert_bias=bias), experts), rate=0.02)
    balanced = per_rank(route(logits, top_k, "sigmoid", expert_bias=bias))
    return dropless, (kept.max() / kept.mean()).item(), balanced


def time_gemm(experts, ep, top_k, tokens, hidden, intermediate, repeats):
    mpu.initialize()
    local = experts // ep
    layer = ExpertParallelExperts(local, hidden, intermediate)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(tokens * top_k, hidden, generator=g)
    counts = torch.bincount(torch.randint(0, local, (tokens * top_k,), generator=g),
                            minlength=local)
    times = {}
    for variant, grouped in (("grouped", True), ("loop", False)):
        layer.grouped_gemm = grouped
        with torch.no_grad():
            times[variant] = time_op(lambda: layer.compute(rows, counts), repeats=repeats)
    assert layer.calls_by_path == {"grouped_gemm", "expert_loop"}
    return times


def run(args) -> list[dict]:
    rows = []
    with LocalWorld(args.ep) as world:
        per_rank = world.run(measure_a2a, args.ep, args.experts, args.top_k, args.tokens,
                             args.hidden, args.intermediate, timeout=600)
    theory = 4 * args.tokens * args.top_k * args.hidden * 4
    measured = statistics.mean(r["bytes"] for r in per_rank)
    rows.append({"part": "a2a", "variant": f"ep={args.ep} per rank", "measured_MB": measured / 1e6,
                 "theory_MB": theory / 1e6, "measured/theory": measured / theory,
                 "off_rank": statistics.mean(r["off_rank"] for r in per_rank)})
    dropless, capped, balanced = load_balance(args.ep, args.experts, args.top_k, args.tokens,
                                              args.hidden, args.skew)
    for variant, value in (("skewed, dropless", dropless), ("skewed, capacity 1.0", capped),
                           ("skewed, sigmoid + bias (50 updates)", balanced)):
        rows.append({"part": "load", "variant": variant, "max/mean": value})
    with LocalWorld(1) as world:
        times = world.run(time_gemm, args.experts, args.ep, args.top_k, args.tokens,
                          args.hidden, args.intermediate, args.repeats, timeout=600)[0]
    ratio = statistics.median(times["loop"]) / statistics.median(times["grouped"])
    for variant in ("grouped", "loop"):
        rows.append({"part": "gemm", "variant": variant, **summarize(times[variant]),
                     "loop/grouped": ratio if variant == "grouped" else None})
    return rows


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--skew", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    notes = ["a2a: payload counted per rank (its own share included), float32; theory = 4 T k H "
             "4 B", "gemm: the local experts of one rank, float32, forward only"]
    return Report("moe", run(args), COLUMNS, ["part", "variant"],
                  {**vars(args), "backend": "gloo", "dtype": "float32"}, notes,
                  plot_value="max/mean")


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
