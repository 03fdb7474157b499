"""``parallelize()`` on a small Llama: memory of the logits and loss, activation memory with and
without sequence parallelism, and step time against torch's ``parallelize_module``.

A transformers ``LlamaForCausalLM`` built from a ``LlamaConfig`` in code (float32, SDPA, seed 0,
random ids of seed 1 as inputs and labels), on tp local gloo ranks with one thread each. Per tp,
in the same processes, the same weights converted four ways:

    ours                  parallelize(model): sequence parallelism, fused ring matmuls
                          (overlap_comm) and the vocab-parallel loss (logits [b, s, V/tp])
    ours no-sp            parallelize(model, sequence_parallel=False) (loss still vocab-parallel)
    ours gathered-loss    parallelize(model, loss_parallel=False): logits gathered to
                          [b, s, V], then transformers' F.cross_entropy over the full vocabulary
    torch                 torch.distributed.tensor.parallel.parallelize_module with the plan of
                          torch's Llama TP tutorial (colwise q/k/v/gate/up, rowwise o/down,
                          SequenceParallel norms, sequence-sharded embedding output, vocab-
                          sharded LM head) and its loss_parallel() cross-entropy

Each converted model's loss must equal the dense model's (float32 tolerance) before anything is
timed. Memory is counted exactly rather than sampled (a CPU has no allocator peak counter): during
one forward + loss, a ``saved_tensors_hooks`` pack hook records every tensor autograd keeps for
backward, and the unique storages' bytes are summed, parameters excluded (they live anyway):

    saved_MiB   everything saved over the whole forward + loss: the activation memory
    trunk_MiB   the part first saved before the LM head (embedding and decoder layers)
    logits_MiB  the LM head's output storage (kept alive by the model's output until backward)
    head_MiB    the storages first saved from the LM head's forward on (head + loss), together
                with the logits: what the head and the loss hold until backward

Time: one forward + backward step, the variants alternating step by step (so all see the same
load on a shared machine); a step ends when its slowest rank does (ranks start together after a
barrier); median and interquartile range over ``--repeats`` steps after ``--warmup``.

    python -m benchmarks.bench_parallelize [--tps 2 4 --hidden 256 --seq 512 --vocab 8192]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks._harness import Report, publish, summarize
from parallelkit import mpu
from parallelkit.launch import LocalWorld, RankFailure
from parallelkit.parallelize import parallelize

QUICK = ["--tps", "2", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "4", "--layers", "1",
         "--vocab", "1024", "--seq", "64", "--batch", "2", "--repeats", "3", "--warmup", "1"]
COLUMNS = [("tp", "d"), ("variant", ""), ("batch", "d"), ("seq", "d"), ("vocab", "d"),
           ("median_ms", ".1f"), ("iqr_ms", ".1f"), ("ours/torch", ".2f"), ("saved_MiB", ".2f"),
           ("no-sp/sp", ".2f"), ("trunk_MiB", ".2f"), ("trunk no-sp/sp", ".2f"),
           ("logits_MiB", ".2f"), ("logits_theory_MiB", ".2f"),
           ("head_MiB", ".2f"), ("gathered/parallel", ".2f"), ("loss_diff", ".1e")]
OURS = {"ours": {}, "ours no-sp": {"sequence_parallel": False},
        "ours gathered-loss": {"loss_parallel": False}}
MiB = 2**20


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.ffn or 3 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                       attn_implementation="sdpa", use_cache=False)


def dense_model(config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().train()


def batch_ids(config, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq),
                         generator=torch.Generator().manual_seed(1))


class SavedBytes:
    """The unique storages autograd saves for backward while its hooks are on (parameters
    excluded), split at the LM head: what is first saved before its forward and from it on."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module):
        self.params = {_storage(p).data_ptr() for p in model.parameters()}
        self.storages: dict[int, tuple[torch.UntypedStorage, bool]] = {}
        self.in_head, self.logits = False, None
        self._handles = [head.register_forward_pre_hook(self._enter, prepend=True),
                         head.register_forward_hook(self._leave)]

    def _enter(self, module, args):
        self.in_head = True

    def _leave(self, module, args, output):
        self.logits, self.logits_contiguous = _storage(output), output.is_contiguous()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        ptr = storage.data_ptr()
        # holding the storage keeps its address from being reused by a later tensor
        if storage.nbytes() and ptr not in self.params and ptr not in self.storages:
            self.storages[ptr] = (storage, self.in_head)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def result(self) -> dict:
        head = {p: s.nbytes() for p, (s, in_head) in self.storages.items() if in_head}
        head[self.logits.data_ptr()] = self.logits.nbytes()
        for handle in self._handles:
            handle.remove()
        trunk = sum(s.nbytes() for s, in_head in self.storages.values() if not in_head)
        return {"saved": sum(s.nbytes() for s, _ in self.storages.values()), "trunk": trunk,
                "logits": self.logits.nbytes(), "head": sum(head.values()),
                "logits_contiguous": self.logits_contiguous}


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage holding ``t``'s data; for a wrapper subclass (a DTensor, funcol's
    AsyncCollectiveTensor inside one) that of the tensor it wraps."""
    while type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        t = getattr(t, inner[0])
    return t.untyped_storage()


class Ours:
    """``parallelize(model, **options)``; the loss from ``model(input_ids, labels=...)``."""

    def __init__(self, config, options: dict):
        self.model = parallelize(dense_model(config), **options)
        self.head = self.model.lm_head

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


class Torch:
    """torch's ``parallelize_module`` with the plan of its Llama TP tutorial, adapted to
    transformers' module names and keyword calls. The embedding's output is sequence-sharded,
    so LlamaModel would size the positions from s/tp tokens: they are passed whole."""

    def __init__(self, config, tp_group: dist.ProcessGroup):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                       RowwiseParallel, SequenceParallel,
                                                       parallelize_module)

        mesh = DeviceMesh.from_group(tp_group, "cpu")
        self.model = dense_model(config)
        layer_plan = {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={
                                                "hidden_states": Replicate()}),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                      desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        for layer in self.model.model.layers:
            parallelize_module(layer, mesh, layer_plan)
        parallelize_module(self.model, mesh, {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(),
                                                  output_layouts=Shard(1)),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                       use_local_output=False),
        })
        self.head = self.model.lm_head

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor.parallel import loss_parallel

        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        logits = self.model(input_ids=ids, position_ids=positions).logits
        shifted = F.pad(ids, (0, 1), value=-100)[:, 1:]  # as transformers' ForCausalLMLoss
        with loss_parallel():
            return F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)

    def backward(self, loss: torch.Tensor) -> None:
        from torch.distributed.tensor.parallel import loss_parallel

        with loss_parallel():
            loss.backward()


def _item(loss: torch.Tensor) -> float:
    loss = loss.detach()
    return float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)


def measure(config, batch: int, seq: int, with_torch: bool, repeats: int, warmup: int) -> dict:
    """On one rank: each variant's loss against the dense model's and its saved bytes (one
    forward + loss under the hooks), then the variants' steps timed, alternating."""
    state = mpu.initialize(tp=dist.get_world_size())
    ids = batch_ids(config, batch, seq)
    dense = _item(dense_model(config)(input_ids=ids, labels=ids).loss)
    runners = {name: Ours(config, options) for name, options in OURS.items()}
    if with_torch:
        runners["torch"] = Torch(config, state.tp.group)
    memory, losses = {}, {}
    for name, runner in runners.items():
        recorder = SavedBytes(runner.model, runner.head)
        with recorder.hooks():
            loss = runner.loss(ids)
        runner.backward(loss)
        memory[name], losses[name] = recorder.result(), _item(loss)
        if abs(losses[name] - dense) > 1e-5 * max(1.0, abs(dense)):
            raise ValueError(f"{name}: loss {losses[name]!r} differs from the dense model's "
                             f"{dense!r} by {abs(losses[name] - dense):.2e} (tp={state.tp.size}); "
                             "the converted model does not compute what the original did")
    seconds = {name: [] for name in runners}
    for step in range(warmup + repeats):
        for name, runner in runners.items():
            runner.model.zero_grad(set_to_none=True)
            dist.barrier()  # ranks start together; waiting for a peer is part of the step
            start = time.perf_counter()
            runner.backward(runner.loss(ids))
            if step >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {"seconds": seconds, "memory": memory, "loss": losses, "dense": dense}


def run(args) -> tuple[list[dict], list[str]]:
    config = llama_config(args)
    rows, notes = [], []
    for tp in args.tps:
        common = (config, args.batch, args.seq)
        with LocalWorld(tp) as world:
            try:
                results = world.run(measure, *common, True, args.repeats, args.warmup,
                                    timeout=600)
            except RankFailure as failure:
                notes.append(f"tp={tp}: torch's parallelize_module could not run or disagreed "
                             f"with the dense model, so it has no row:\n{failure}")
                results = None
        if results is None:
            with LocalWorld(tp) as world:  # the failed world was torn down
                results = world.run(measure, *common, False, args.repeats, args.warmup,
                                    timeout=600)
        rows += _rows(tp, results, args)
    return rows, notes


def _rows(tp: int, results: list[dict], args) -> list[dict]:
    names = list(results[0]["seconds"])
    per_step = {name: [max(step) for step in zip(*(r["seconds"][name] for r in results))]
                for name in names}  # a step ends when its slowest rank does
    rows = {}
    for name in names:
        memory = {k: max(r["memory"][name][k] for r in results)
                  for k in ("saved", "trunk", "logits", "head")}
        vocab_shards = 1 if name == "ours gathered-loss" else tp
        rows[name] = {"tp": tp, "variant": name, "batch": args.batch, "seq": args.seq,
                      "vocab": args.vocab, **summarize(per_step[name]),
                      "saved_MiB": memory["saved"] / MiB, "trunk_MiB": memory["trunk"] / MiB,
                      "logits_MiB": memory["logits"] / MiB,
                      "logits_contiguous": all(r["memory"][name]["logits_contiguous"]
                                               for r in results),
                      "logits_theory_MiB": args.batch * args.seq * args.vocab // vocab_shards * 4
                      / MiB, "head_MiB": memory["head"] / MiB,
                      "loss": results[0]["loss"][name],
                      "loss_diff": abs(results[0]["loss"][name] - results[0]["dense"]),
                      "flops": model_flops(args) / tp, "dtype": "float32"}
    for name, row in rows.items():
        if name.startswith("ours") and "torch" in rows:  # paired step by step, then the median
            row["ours/torch"] = statistics.median(a / b for a, b in zip(per_step[name],
                                                                         per_step["torch"]))
    for key, ratio in (("saved_MiB", "no-sp/sp"), ("trunk_MiB", "trunk no-sp/sp")):
        rows["ours no-sp"][ratio] = rows["ours no-sp"][key] / rows["ours"][key]
    rows["ours gathered-loss"]["gathered/parallel"] = (rows["ours gathered-loss"]["head_MiB"]
                                                       / rows["ours"]["head_MiB"])
    return list(rows.values())


def _copied_logits_notes(rows: list[dict]) -> list[str]:
    """Where a vocab-parallel loss holds a second copy of the logits (head_MiB ≈ 2·logits_MiB,
    not 1·: e.g. non-contiguous logits flattened with a copy that the loss saves), say so."""
    found = [r for r in rows if r["variant"] in ("ours", "ours no-sp")
             and r["head_MiB"] > 1.5 * r["logits_MiB"]]
    return [f"{', '.join(sorted({r['variant'] for r in found}))}: the loss holds a second copy "
            "of the logits: head_MiB/logits_MiB = " + ", ".join(
                f"{r['head_MiB'] / r['logits_MiB']:.2f} (tp={r['tp']}, {r['variant']}, "
                f"logits contiguous: {r['logits_contiguous']})" for r in found)] if found else []


def model_flops(args) -> float:
    """Matmul FLOPs of one training step (3x the forward's), T = b·s tokens: per layer q and o
    2·T·h² each, k and v 2·T·h·kv_dim each, the gated MLP 3·2·T·h·ffn, attention 4·b·s²·h
    (counted whole, causal or not); the head 2·T·h·V."""
    tokens, h, ffn = args.batch * args.seq, args.hidden, args.ffn or 3 * args.hidden
    kv_dim = h // args.heads * args.kv_heads
    attention = 4 * args.batch * args.seq**2 * h
    layer = 2 * tokens * (2 * h * h + 2 * h * kv_dim + 3 * h * ffn) + attention
    return 3 * (args.layers * layer + 2 * tokens * h * args.vocab)


def collect(argv=None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=None, help="default 3·hidden")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # other processes on the machine skew CPU timings
    rows, notes = run(args)
    load = [load_before, os.getloadavg()[0]]
    b, s, v = args.batch, args.seq, args.vocab
    notes += [
        "memory per rank (max over ranks), counted exactly: unique storages saved for backward "
        "(saved_tensors_hooks) during one forward + loss, parameters excluded; head_MiB = those "
        "first saved from the LM head's forward on, plus the logits' storage",
        f"logits_theory_MiB = b·s·V/tp·4 bytes (gathered: b·s·V·4 = {b * s * v * 4 / MiB:.2f}); "
        "a gathered loss also saves F.cross_entropy's log-softmax [b·s, V], so its head_MiB "
        "should be about 2·b·s·V·4, and the vocab-parallel loss's about b·s·V/tp·4 (it saves "
        "the logits it is given): gathered/parallel ≈ 2·tp",
        "no-sp/sp = saved_MiB without / with sequence parallelism (loss vocab-parallel in "
        "both); trunk no-sp/sp the same for trunk_MiB, the decoder layers without the head",
        *_copied_logits_notes(rows),
        "ours/torch = median over steps of our step time / torch's step right after it",
        f"load average (1 min) before/after: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} "
        "cores; with tp > cores, ranks share cores",
    ]
    config = llama_config(args)
    settings = {**vars(args), "ffn": config.intermediate_size, "backend": "gloo",
                "dtype": "float32", "model": "LlamaForCausalLM", "attn_implementation": "sdpa",
                "seed": 0, "llama_config": config.to_diff_dict(),
                "load_average_before_after": load,
                "note": "tp CPU processes, one thread each, share the machine's cores"}
    return Report("parallelize", rows, COLUMNS, ["tp", "variant"], settings, notes)


def main(argv=None) -> None:
    publish(collect(argv))


if __name__ == "__main__":
    main()
