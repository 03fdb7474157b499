"""``python -m parallelkit demo``: train a small model two ways and show the loss curves agree.

The single-process model trains on the whole batch in this process. The same model, converted by
``parallelize`` for TP × CP and wrapped for DP (gradients averaged over DP × CP), trains on
``world`` forked gloo ranks (or the ranks ``torchrun`` launched): each rank gets its DP share of the
sequences and its zigzag CP share of their tokens. The conversion takes the fast path
(parallelize's defaults): sequence parallelism, the fused ring matmuls of ``csrc/`` and the
vocab-parallel cross-entropy through ``model(ids, labels=...)``; the report names the paths the
TP layers actually ran. With ``pp > 1`` the repo's TinyLM (a GPT) is
split into pipeline stages instead and trained with the 1F1B schedule over micro-batches (TP × PP
× DP). Same seed, same data, same AdamW: the curves match to float32 rounding, and the table and
PNG show it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class DemoConfig:
    world: int = 8
    tp: int = 2
    cp: int = 2
    pp: int = 1
    steps: int = 30
    batch: int = 8        # sequences per step, split across DP ranks
    seq: int = 64         # tokens per sequence, split across CP ranks
    vocab: int = 256
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    lr: float = 3e-3
    seed: int = 0


def build_model(cfg: DemoConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden,
                         intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         max_position_embeddings=cfg.seq, attn_implementation="sdpa")
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def batch_for_step(cfg: DemoConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic text with structure to learn: every token is followed by a fixed successor
    (one permutation of the vocabulary) except for 10% noise. Returns ids [batch, seq] and
    next-token labels (last position ignored)."""
    successor = torch.randperm(cfg.vocab, generator=torch.Generator().manual_seed(cfg.seed))
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + step + 1)
    ids = torch.empty(cfg.batch, cfg.seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, cfg.vocab, (cfg.batch,), generator=g)
    for t in range(1, cfg.seq):
        ids[:, t] = successor[ids[:, t - 1]]
    noise = torch.rand(ids.shape, generator=g) < 0.1
    ids[noise] = torch.randint(0, cfg.vocab, (int(noise.sum()),), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    return ids, labels


def build_tinylm(cfg: DemoConfig):
    from parallelkit.models.tinylm import TinyConfig, TinyLM

    torch.manual_seed(cfg.seed)
    return TinyLM(TinyConfig(vocab=cfg.vocab, hidden=cfg.hidden, heads=cfg.heads,
                             ffn=4 * cfg.hidden, layers=cfg.layers))


def train_single(cfg: DemoConfig, progress: bool = True) -> list[float]:
    """The reference: the dense model on the whole batch, in this process."""
    from tqdm import tqdm

    model = build_model(cfg) if cfg.pp == 1 else build_tinylm(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for step in tqdm(range(cfg.steps), desc="single process", disable=not progress):
        ids, labels = batch_for_step(cfg, step)
        if cfg.pp == 1:
            logits = model(input_ids=ids).logits
        else:  # TinyLM is sequence-first
            logits, labels = model(ids.t()), labels.t()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def train_parallel(cfg: DemoConfig, progress: bool = True) -> tuple[list[float], list[str]]:
    """On one rank: TP × CP via parallelize, DP via the bucketed wrapper. Returns the global loss
    of every step (identical on all ranks) and the paths the TP layers ran."""
    from tqdm import tqdm

    from parallelkit.context_parallel import context_parallel_positions
    from parallelkit.data_parallel import DistributedDataParallel
    from parallelkit.distributed import comm, mpu
    from parallelkit.parallelize import parallelize, shard_batch

    state = mpu.initialize(tp=cfg.tp, cp=cfg.cp)
    dp, dp_rank, cp_rank = state.dp.size, state.dp.rank, state.cp.rank
    if cfg.batch % dp:
        raise ValueError(f"batch={cfg.batch} sequences do not split over dp={dp} ranks")
    model = DistributedDataParallel(parallelize(build_model(cfg)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    positions = context_parallel_positions(cfg.seq, cp_rank, cfg.cp).expand(cfg.batch // dp, -1)
    sync_group, sync_size = state.dp_cp.group, state.dp_cp.size
    losses = []
    show = progress and dist.get_rank() == 0
    for step in tqdm(range(cfg.steps), desc=f"{dist.get_world_size()} ranks", disable=not show):
        ids, labels = batch_for_step(cfg, step)
        tokens = int((labels != -100).sum())
        ids, labels = (shard_batch(t.chunk(dp)[dp_rank], state.cp.group, dim=1)
                       for t in (ids, labels))
        # labels are already next-token ids (shift_labels: split with the tokens, not shifted
        # again); the loss is the vocab-parallel mean over this rank's tokens.
        loss = model(input_ids=ids, position_ids=positions, labels=labels,
                     shift_labels=labels).loss
        loss_sum = loss * (labels != -100).sum()
        # The wrapper averages gradients over DP x CP; scaling by its size makes that average
        # the gradient of the mean over every token of the global batch.
        (loss_sum * sync_size / tokens).backward()
        model.finish_grad_sync()
        optimizer.step()
        model.zero_grad_buffer()
        losses.append(comm.all_reduce(loss_sum.detach(), sync_group).item() / tokens)
    return losses, layer_paths(model)


def layer_paths(model: torch.nn.Module) -> list[str]:
    """Every path the TP layers of ``model`` took (their ``calls_by_path``)."""
    return sorted(set().union(*(m.calls_by_path for m in model.modules()
                                if hasattr(m, "calls_by_path"))))


def train_pipeline(cfg: DemoConfig, progress: bool = True) -> tuple[list[float], list[str]]:
    """On one rank: TinyLM converted for TP, its blocks split into pp stages run by the 1F1B
    schedule over one-sequence micro-batches, gradients averaged over DP. Returns the global
    loss of every step (identical on all ranks) and the paths the TP layers ran."""
    from tqdm import tqdm

    from parallelkit.data_parallel import DistributedDataParallel
    from parallelkit.distributed import comm, mpu
    from parallelkit.parallelize import parallelize
    from parallelkit.pipeline_parallel import PipelineStage, train_step

    state = mpu.initialize(tp=cfg.tp, pp=cfg.pp)
    dp, dp_rank = state.dp.size, state.dp.rank
    if cfg.batch % dp:
        raise ValueError(f"batch={cfg.batch} sequences do not split over dp={dp} ranks")
    # The stages pass [s, b, h] activations: without sequence parallelism's [s/tp, b, h] split.
    model = parallelize(build_tinylm(cfg), sequence_parallel=False)
    stage = PipelineStage.from_layers(model.blocks, _lm_loss, pre=model.embed,
                                      post=torch.nn.Sequential(model.ln_f, model.lm_head))
    synced = DistributedDataParallel(torch.nn.ParameterList(stage.parameters()))
    optimizer = torch.optim.AdamW(stage.parameters(), lr=cfg.lr)
    micro = cfg.batch // dp  # micro-batches of one sequence
    losses = []
    show = progress and dist.get_rank() == 0
    for step in tqdm(range(cfg.steps), desc=f"{dist.get_world_size()} ranks", disable=not show):
        ids, labels = (t.chunk(dp)[dp_rank].t() for t in batch_for_step(cfg, step))
        with synced.no_sync():  # the schedule runs every backward; sync the sum once after
            loss = train_step("1f1b", stage, ids, labels, micro, (cfg.seq, 1, cfg.hidden))
        synced.finish_grad_sync()
        optimizer.step()
        synced.zero_grad_buffer()
        losses.append(comm.all_reduce(loss.float(), state.dp.group).item() / dp)
    return losses, layer_paths(model)


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def report(cfg: DemoConfig, parallel: list[float], single: list[float],
           paths: list[str] = ()) -> tuple[str, float]:
    diff = max(abs(a - b) for a, b in zip(parallel, single))
    dp = cfg.world // (cfg.tp * cfg.cp * cfg.pp)
    if cfg.pp == 1:
        model = f"Llama ({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads / {cfg.kv_heads} kv)"
        layout = f"tp {cfg.tp} x cp {cfg.cp} x dp {dp}"
    else:
        model = f"TinyLM GPT ({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads)"
        layout = f"tp {cfg.tp} x pp {cfg.pp} (1F1B) x dp {dp}"
    lines = [f"{model}, {cfg.steps} AdamW steps of {cfg.batch} x {cfg.seq} tokens",
             f"parallel: {cfg.world} gloo ranks = {layout}; single: one process, whole batch",
             *([f"TP layers ran: {'; '.join(paths)}"] if paths else []), "",
             " step   parallel     single   |diff|"]
    for step, (a, b) in enumerate(zip(parallel, single)):
        if step < 5 or step % 5 == 4 or step == len(single) - 1:
            lines.append(f"{step:5d}  {a:9.6f}  {b:9.6f}  {abs(a - b):.1e}")
    lines.append(f"\nmax |parallel - single| over {len(single)} steps: {diff:.2e}")
    return "\n".join(lines), diff


def plot(parallel: list[float], single: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(single, label="single process", linewidth=3, alpha=0.5)
    ax.plot(parallel, label="parallel", linestyle="--")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DemoConfig, png: str | None, tolerance: float = 1e-4) -> bool:
    """The whole job: reference here, parallel on local ranks (or under torchrun)."""
    if "WORLD_SIZE" in os.environ:
        return _run_under_torchrun(cfg, png, tolerance)
    from parallelkit.launch import LocalWorld

    with LocalWorld(cfg.world) as world:  # fork before this process does anything heavy
        single = train_single(cfg)
        job = train_parallel if cfg.pp == 1 else train_pipeline
        parallel, paths = world.run(job, cfg, timeout=1800)[0]
    return _finish(cfg, parallel, single, png, tolerance, paths)


def _finish(cfg, parallel, single, png, tolerance, paths=()) -> bool:
    text, diff = report(cfg, parallel, single, paths)
    print(text)
    if png:
        plot(parallel, single, png, text.splitlines()[1].split("= ")[1].split(";")[0]
             + " vs one process")
        print(f"wrote {png}")
    ok = diff <= tolerance
    print("OK: the curves agree" if ok else f"MISMATCH: difference above {tolerance}")
    return ok


def _run_under_torchrun(cfg: DemoConfig, png, tolerance) -> bool:
    dist.init_process_group("gloo")  # CPU demo; the layers also run on NCCL with CUDA tensors
    try:
        cfg = DemoConfig(**{**asdict(cfg), "world": dist.get_world_size()})
        parallel, paths = (train_parallel if cfg.pp == 1 else train_pipeline)(cfg)
        if dist.get_rank() != 0:
            return True
        return _finish(cfg, parallel, train_single(cfg), png, tolerance, paths)
    finally:
        from parallelkit.distributed import mpu

        mpu.destroy()
        dist.destroy_process_group()
