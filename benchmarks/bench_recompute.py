"""Activation recomputation on a small Llama at tp=2: memory saved for backward and step time of
``recompute`` None, "selective" and "full" (``parallelkit.recompute.apply_recompute``).

A transformers ``LlamaForCausalLM`` (float32, SDPA, attention dropout on, seed 0; random ids of
seed 1 as inputs and labels) converted by ``parallelize`` with its defaults (sequence
parallelism, fused ring matmuls, vocab-parallel loss) on tp local gloo ranks with one thread
each, then recomputed three ways in the same processes from the same weights:

    none        every activation kept for backward
    selective   each layer's attention core (the attention interface call) recomputed: SDPA with
                dropout (math path) saves the probabilities, the dropout noise and the dropped
                probabilities, float32 [b, heads/tp, s, s] each
    full        each decoder layer recomputed: only its inputs ([b, s/tp, h] under sequence
                parallelism, and the rotary cos/sin it is given) are kept

Memory is counted exactly, as ``bench_parallelize`` does (its ``SavedBytes``): the unique
storages autograd saves during one forward + loss, parameters excluded; ``trunk_MiB`` is the
part saved before the LM head. Before anything is timed, each mode's loss (dropout on, every
stream reseeded) must equal the no-recompute loss bitwise. Time: one forward + backward step,
the modes taking turns step by step after a barrier; a step ends when its slowest rank does.

    python -m benchmarks.bench_recompute [--tp 2 --hidden 256 --layers 4 --seq 512]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from benchmarks._harness import (Report, paired_ratio, publish, slowest_per_step, summarize,
                                 time_alternating)
from benchmarks.bench_parallelize import (SavedBytes, batch_ids, dense_model, llama_config,
                                          model_flops)
from parallelkit import mpu
from parallelkit.launch import LocalWorld
from parallelkit.parallelize import parallelize
from parallelkit.recompute import apply_recompute
from parallelkit.tensor_parallel.random import model_parallel_seed

MODES = {"none": None, "selective": "selective", "full": "full"}
QUICK = ["--hidden", "64", "--heads", "4", "--kv-heads", "2", "--layers", "2", "--vocab", "512",
         "--seq", "64", "--batch", "2", "--repeats", "3", "--warmup", "1"]
COLUMNS = [("tp", "d"), ("recompute", ""), ("layers", "d"), ("seq", "d"), ("median_ms", ".1f"),
           ("iqr_ms", ".1f"), ("time_vs_none", ".2f"), ("saved_MiB", ".2f"),
           ("trunk_MiB", ".2f"), ("trunk_vs_none", ".3f"), ("dropped_B/score", ".2f"),
           ("inputs_MiB", ".2f"), ("loss_diff", ".1e")]
MiB = 2**20


def saved_for_backward(model: torch.nn.Module, step, head: torch.nn.Module | None = None) -> dict:
    """Bytes autograd saves while ``step()`` (a forward + loss) runs: "saved" all of them,
    "trunk" those before ``head`` (default: the model's output embedding, its LM head) runs;
    ``step``'s result under "result"."""
    recorder = SavedBytes(model, head if head is not None else model.get_output_embeddings())
    with recorder.hooks():
        result = step()
    return {**recorder.result(), "result": result}


def measure(config, batch: int, seq: int, repeats: int, warmup: int) -> dict:
    """On one rank: each mode's saved bytes and loss (bitwise against none's), then the modes'
    steps timed, taking turns."""
    state = mpu.initialize(tp=dist.get_world_size())
    ids = batch_ids(config, batch, seq)
    models = {name: apply_recompute(parallelize(dense_model(config)), mode)
              for name, mode in MODES.items()}
    memory, losses = {}, {}
    for name, model in models.items():
        model_parallel_seed(1, state.tp.group)  # each mode draws the same dropout masks
        found = saved_for_backward(model, lambda: model(input_ids=ids, labels=ids).loss)
        loss = found.pop("result")
        loss.backward()
        memory[name], losses[name] = found, loss.detach()
        if not torch.equal(losses[name], losses["none"]):
            raise ValueError(f"recompute={name}: loss {losses[name].item()!r} differs from the "
                             f"loss without recompute {losses['none'].item()!r}: the recompute "
                             "did not replay the forward exactly")

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        return run

    seconds = time_alternating({name: step(m) for name, m in models.items()}, repeats=repeats,
                               warmup=warmup, group=state.tp.group)
    return {"seconds": seconds, "memory": memory,
            "loss": {name: loss.item() for name, loss in losses.items()}}


def run(args) -> list[dict]:
    config = llama_config(args)
    config.attention_dropout = args.attention_dropout
    with LocalWorld(args.tp) as world:
        results = world.run(measure, config, args.batch, args.seq, args.repeats, args.warmup,
                            timeout=900)
    per_step = {name: slowest_per_step([r["seconds"][name] for r in results]) for name in MODES}
    memory = {name: {key: max(r["memory"][name][key] for r in results)
                     for key in ("saved", "trunk")} for name in MODES}
    # the attention scores each layer holds per rank: [b, heads/tp, s, s]
    scores = args.layers * args.batch * args.heads // args.tp * args.seq**2
    rows = []
    for name in MODES:
        rows.append({"tp": args.tp, "recompute": name, "layers": args.layers, "seq": args.seq,
                     **summarize(per_step[name]),
                     "time_vs_none": paired_ratio(per_step[name], per_step["none"]),
                     "saved_MiB": memory[name]["saved"] / MiB,
                     "trunk_MiB": memory[name]["trunk"] / MiB,
                     "trunk_vs_none": memory[name]["trunk"] / memory["none"]["trunk"],
                     "loss": results[0]["loss"][name],
                     "loss_diff": abs(results[0]["loss"][name] - results[0]["loss"]["none"]),
                     "flops": model_flops(args) / args.tp, "dtype": "float32"})
    rows[1]["dropped_B/score"] = (memory["none"]["trunk"] - memory["selective"]["trunk"]) / scores
    # sequence parallelism: a layer's input is this rank's s/tp tokens
    rows[2]["inputs_MiB"] = args.layers * args.batch * args.seq // args.tp * args.hidden * 4 / MiB
    return rows


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=None, help="default 3·hidden")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--attention-dropout", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # other processes on the machine skew CPU timings
    rows = run(args)
    load = [load_before, os.getloadavg()[0]]
    notes = [
        "memory per rank (max over ranks), counted exactly: unique storages saved for backward "
        "(saved_tensors_hooks) during one forward + loss, parameters excluded; trunk = saved "
        "before the LM head (embedding and decoder layers)",
        "dropped_B/score = (trunk none - trunk selective) / (layers·b·heads/tp·s²): the bytes "
        "per attention score selective stops keeping. SDPA with dropout on CPU (its math path) "
        "keeps three float32 [b, heads/tp, s, s] tensors: the probabilities, the dropout noise "
        "and the dropped probabilities, 12 bytes; the [b, heads/tp, s, d] tensors of either "
        "side (the checkpoint keeps q, k, v) move it by about 4·d/s bytes each",
        "inputs_MiB = layers·b·(s/tp)·h·4: the layer inputs full recompute keeps; its trunk_MiB "
        "adds the embedding's and the rotary cos/sin",
        "time_vs_none = median over steps of the mode's step time / none's step next to it; "
        "achieved counts the model's FLOPs, not the recomputed ones",
        f"load average (1 min) before/after: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} "
        "cores; with tp > cores, ranks share cores",
    ]
    config = llama_config(args)
    settings = {**vars(args), "ffn": config.intermediate_size, "backend": "gloo",
                "dtype": "float32", "model": "LlamaForCausalLM", "attn_implementation": "sdpa",
                "parallelize": "defaults (sequence parallel, overlap_comm, loss_parallel)",
                "seed": 0, "load_average_before_after": load,
                "note": "tp CPU processes, one thread each, share the machine's cores"}
    return Report("recompute", rows, COLUMNS, ["tp", "recompute"], settings, notes)


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
