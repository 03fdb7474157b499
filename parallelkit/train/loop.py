"""``train(TrainConfig(...))``: one entry point for TP x CP x DP and TP x PP x DP training.

Where it runs: under torchrun (``WORLD_SIZE`` set) each process is a rank (NCCL with one GPU per
rank when CUDA is available, else gloo); inside an existing process group (tests) the calling
ranks train; otherwise it forks ``cfg.world`` local gloo ranks (``LocalWorld``). The config is
checked before anything starts, so a bad one is one clear error.

One step on one rank: ``accumulation`` micro-batches (``data.BatchLoader``); with pp = 1 each
runs forward and backward through the model (gradient sync only after the last one: ``no_sync``),
with pp > 1 the 1F1B schedule runs them through the stages. Then the gradients are averaged over
DP (x CP), clipped by the global norm, the optimizer steps (fp32 masters), the LR schedule
advances. The loss reported is the mean over every token of the global batch.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from parallelkit.train.config import TrainConfig, check
from parallelkit.train.progress import TrainResult

LOCAL_TIMEOUT_S = 7 * 24 * 3600  # a local run is as long as it is; LocalWorld needs a bound


def train(cfg: TrainConfig) -> TrainResult:
    """Run ``cfg`` and return rank 0's :class:`TrainResult` (every rank's, in a process group);
    rank 0 also writes the loss plot (``cfg.plot``)."""
    if dist.is_available() and dist.is_initialized():
        return run_rank(cfg)
    if "WORLD_SIZE" in os.environ:
        return _under_torchrun(cfg)
    world = cfg.world or cfg.tp * cfg.pp * cfg.cp
    validate(cfg, world)  # here: one error in this process rather than one per rank
    from parallelkit.launch import LocalWorld

    with LocalWorld(world) as ranks:
        return ranks.run(run_rank, cfg, timeout=LOCAL_TIMEOUT_S)[0]


def validate(cfg: TrainConfig, world: int) -> None:
    """Every check that needs no process group: the config, the model, the data source."""
    from parallelkit.train.model import model_spec

    check(cfg, world)
    _source(cfg, model_spec(cfg).vocab)


def _under_torchrun(cfg: TrainConfig) -> TrainResult:
    validate(cfg, int(os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", timeout=timedelta(minutes=30))
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    try:
        return run_rank(cfg)
    finally:
        dist.destroy_process_group()


def run_rank(cfg: TrainConfig) -> TrainResult:
    """This rank's part of the run (a collective over the world)."""
    from parallelkit.distributed import mpu

    check(cfg, dist.get_world_size())
    state = mpu.initialize(tp=cfg.tp, pp=cfg.pp, cp=cfg.cp)
    try:
        return _run(cfg, state)
    finally:
        mpu.destroy()


def _run(cfg: TrainConfig, state) -> TrainResult:
    from parallelkit.train import resume
    from parallelkit.train.data import BatchLoader
    from parallelkit.train.model import build
    from parallelkit.train.progress import Meter, peak_memory_bytes

    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = build(cfg, device)
    loader = BatchLoader(_source(cfg, parts.spec.vocab), cfg.global_batch, cfg.micro_batch,
                         state.dp.rank, state.dp.size, state.cp.rank, state.cp.size, cfg.seed)
    resumed = resume.load_latest(cfg, parts, loader)
    done, losses = resumed if resumed is not None else (0, {})
    last = cfg.stop_after or cfg.steps
    rank0 = dist.get_rank() == 0
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else _measured_peak(cfg, device)
    meter = Meter(cfg.global_batch * cfg.seq, parts.flops_per_token,
                  peak * dist.get_world_size(), device, done, last, cfg.progress and rank0)
    saved = None
    for step in range(done + 1, last + 1):
        meter.start_step()
        losses[step] = _step(cfg, parts, loader.micro_batches(step - 1, device), state)
        meter.end_step(losses[step])
        due = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        if cfg.checkpoint_dir and (due or step == last):
            saved = resume.save(cfg, parts, step, loader, losses)
    meter.close()
    rate = meter.tokens_per_s()
    memory, kind = peak_memory_bytes(device)
    layout = (f"tp {state.tp.size} x cp {state.cp.size} x dp {state.dp.size} x pp "
              f"{state.pp.size} ({dist.get_world_size()} ranks, {cfg.precision})")
    result = TrainResult(losses, list(range(done + 1, last + 1)), done if resumed else None,
                         rate, meter.mfu(rate), peak, memory, kind, layout, saved, meter.times)
    if rank0 and cfg.plot and losses:
        from parallelkit.train.progress import plot_losses

        plot_losses(losses, cfg.plot, f"{cfg.model}: {layout}")
    return result


def _measured_peak(cfg: TrainConfig, device: torch.device) -> float:
    """A GEMM's FLOP/s on rank 0's device (the others wait: they share the machine), for all."""
    from parallelkit.distributed import comm
    from parallelkit.train.model import DTYPES
    from parallelkit.train.progress import measure_peak_flops

    rate = measure_peak_flops(device, DTYPES[cfg.precision]) if dist.get_rank() == 0 else 0.0
    return comm.all_reduce(torch.tensor([rate], dtype=torch.float64, device=device),
                           dist.group.WORLD, op="max").item()


def _source(cfg: TrainConfig, vocab: int):
    from parallelkit.train.data import MemmapTokens, SyntheticTokens

    if cfg.data == "synthetic":
        return SyntheticTokens(vocab, cfg.seq, cfg.synthetic_samples, cfg.seed)
    return MemmapTokens(cfg.data, cfg.seq, vocab, cfg.data_dtype)


def _step(cfg: TrainConfig, parts, batches, state) -> float:
    """One optimizer step on this rank; returns the global mean loss (equal on every rank)."""
    from parallelkit.distributed import comm

    optimizer = parts.optimizer
    if parts.stage is not None:
        loss, group, replicas = _pipeline_loss(cfg, parts, batches), state.dp.group, state.dp.size
    else:
        loss = torch.zeros((), dtype=torch.float64, device=batches[0].ids.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else parts.ddp.no_sync():
                micro = _forward_loss(parts, batch)
                optimizer.scale_loss(micro / len(batches)).backward()
            loss += micro.detach().double() / len(batches)
        group, replicas = state.dp_cp.group, state.dp_cp.size
    parts.ddp.finish_grad_sync()
    if cfg.grad_clip is not None:
        optimizer.clip_grad_norm(cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    parts.scheduler.step()
    return comm.all_reduce(loss, group).item() / replicas


def _forward_loss(parts, batch) -> torch.Tensor:
    """The mean loss over this rank's tokens of one micro-batch (pp = 1)."""
    if parts.spec.kind == "tinylm":  # sequence-first, logits gathered over TP
        logits = parts.ddp(batch.ids.t())
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 batch.labels.t().flatten())
    # labels are next tokens already (shift_labels: split with the tokens, not shifted again);
    # the loss is the vocab-parallel cross-entropy over this rank's tokens.
    return parts.ddp(input_ids=batch.ids, position_ids=batch.positions.expand_as(batch.ids),
                     labels=batch.labels, shift_labels=batch.labels).loss


def _pipeline_loss(cfg: TrainConfig, parts, batches) -> torch.Tensor:
    """1F1B over the micro-batches; the mean loss over them (unscaled), on every pp rank."""
    from parallelkit.pipeline_parallel import train_step

    ids = torch.cat([b.ids for b in batches]).t()  # [s, micro * accumulation]: sequence-first
    labels = torch.cat([b.labels for b in batches]).t()
    scale = parts.optimizer.loss_scale
    with parts.ddp.no_sync():  # the schedule runs every backward; sync the sum once after
        loss = train_step("1f1b", parts.stage, ids, labels, len(batches),
                          (cfg.seq, cfg.micro_batch, parts.spec.hidden))
    return loss / scale
