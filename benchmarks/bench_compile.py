"""torch.compile of parallelize()d models on CPU ranks: step time compiled against eager.

A TinyLM and a transformers Llama (float32, vocabulary 8192), converted with parallelize's
defaults (sequence parallelism, the fused overlap rings, the vocab-parallel loss) on tp local
gloo ranks (and cp for ring attention), then compiled with ``torch.compile(fullgraph=True)``
(inductor, the C++ backend on CPU). Before timing, the compiled loss must equal eager's. One
step is forward + backward of a loss; compiled and eager steps take turns after a barrier, a
step ending when its slowest rank does; ``compile_s`` is the first compiled step (tracing and
code generation).

    python -m benchmarks.bench_compile [--tp 2 --cp 1 --hidden 256 --layers 2 --seq 512]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks._harness import (Report, paired_ratio, publish, slowest_per_step, summarize,
                                 time_alternating)
from parallelkit import mpu
from parallelkit.context_parallel import context_parallel_positions, split_for_context_parallel
from parallelkit.launch import LocalWorld
from parallelkit.models.tinylm import TinyConfig, TinyLM
from parallelkit.parallelize import parallelize
from parallelkit.testing.tolerances import assert_close

QUICK = ["--hidden", "64", "--layers", "1", "--seq", "64", "--repeats", "3"]
COLUMNS = [("model", ""), ("tp", "d"), ("cp", "d"), ("variant", ""), ("median_ms", ".1f"),
           ("iqr_ms", ".1f"), ("compile_s", ".1f"), ("compiled/eager", ".2f")]
VOCAB = 8192


def build(name: str, hidden: int, layers: int):
    if name == "tinylm":
        return TinyLM(TinyConfig(vocab=VOCAB, hidden=hidden, heads=hidden // 32, ffn=4 * hidden,
                                 layers=layers))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=2,
        max_position_embeddings=4 * 4096, attn_implementation="sdpa"))


def step_of(name: str, state, cp: int, seq: int):
    g = torch.Generator().manual_seed(1)
    if name == "tinylm":
        ids = torch.randint(0, VOCAB, (seq, 2), generator=g)
        local = split_for_context_parallel(ids, state.cp.rank, cp, dim=0)
        return lambda model: model(local).float().pow(2).mean()
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    local = split_for_context_parallel(ids, state.cp.rank, cp, dim=1)
    positions = context_parallel_positions(seq, state.cp.rank, cp).expand(2, -1)
    shift = split_for_context_parallel(torch.roll(ids, -1, 1), state.cp.rank, cp, dim=1)
    return lambda model: model(input_ids=local, position_ids=positions, shift_labels=shift,
                               labels=shift, use_cache=False).loss


def measure(name, tp, cp, hidden, layers, seq, repeats):
    state = mpu.initialize(tp=tp, cp=cp)
    torch.manual_seed(0)
    dense = build(name, hidden, layers)
    eager, converted = parallelize(copy.deepcopy(dense)), parallelize(copy.deepcopy(dense))
    step = step_of(name, state, cp, seq)
    compiled = torch.compile(step, fullgraph=True)
    start = time.perf_counter()
    loss = compiled(converted)
    loss.backward()
    compile_s = time.perf_counter() - start
    assert_close(loss.detach(), step(eager).detach(), name="compiled loss",
                 terms=seq * 2 + VOCAB + layers * (seq + 5 * hidden))
    seconds = time_alternating({"eager": lambda: step(eager).backward(),
                                "compiled": lambda: compiled(converted).backward()},
                               repeats=repeats, warmup=1, group=state.tp.group)
    return {"seconds": seconds, "compile_s": compile_s}


def run(args) -> list[dict]:
    rows = []
    world = args.tp * args.cp
    with LocalWorld(world) as ranks:
        for name in ("tinylm", "llama"):
            per_rank = ranks.run(measure, name, args.tp, args.cp, args.hidden, args.layers,
                                 args.seq, args.repeats, timeout=1200)
            steps = {v: slowest_per_step([r["seconds"][v] for r in per_rank])
                     for v in ("eager", "compiled")}
            for variant in ("eager", "compiled"):
                rows.append({"model": name, "tp": args.tp, "cp": args.cp, "variant": variant,
                             **summarize(steps[variant]),
                             "compile_s": max(r["compile_s"] for r in per_rank)
                             if variant == "compiled" else None,
                             "compiled/eager": paired_ratio(steps["compiled"], steps["eager"])
                             if variant == "compiled" else None})
    return rows


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    notes = ["compiled/eager: median over steps of the compiled step time / the eager step next "
             "to it (below 1: compiled is faster)"]
    return Report("compile", run(args), COLUMNS, ["model", "variant"],
                  {**vars(args), "backend": "gloo", "dtype": "float32",
                   "compiler": "inductor"}, notes, plot_value="median_ms")


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
