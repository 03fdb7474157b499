"""Checkpoints of a run, and resuming from the latest one bit for bit.

On disk, in ``checkpoint_dir``::

    step_0000010/     a parallelkit.checkpoint folder (DCP; a crash mid-save leaves the old one)
    latest.json       {"step", "folder", "layout", "run"}: written by rank 0 once every rank has
                      saved, so it only ever names a complete checkpoint

What a checkpoint holds, and what a resume restores:

- the model: every parameter, TP shards described to DCP as DTensors, so the weights also load
  at another layout or into the dense model (``checkpoint.load_checkpoint(folder, model)``);
- the optimizer: AdamW's moments and step and the fp32 master weights, under keys naming the
  pipeline and TP rank (and the DP x CP rank with ZeRO, whose shards differ): DP replicas write
  one copy, and the run resumes at the layout it was saved at (checked first);
- the trainer: the step, the data position (epoch, samples of it consumed, samples per
  epoch), the LR scheduler, the fp16 loss scaler, the loss history (for the plot);
- per rank, every random stream: the CPU generator, each CUDA device's, the TP tracker's.

The data order is a function of the step (``data.BatchLoader``), so restoring the step restores
the data position; it is saved as well, and a resume whose data would be elsewhere (the token
file changed) is refused. Restored in that state, the next step computes what the
uninterrupted run computed: the tests compare losses and weights bitwise.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from parallelkit import checkpoint
from parallelkit.checkpoint_files import METADATA
from parallelkit.distributed import mpu
from parallelkit.tensor_parallel.random import get_rng_tracker
from parallelkit.train.config import TrainConfig, run_identity

LATEST = "latest.json"


def layout_of(cfg: TrainConfig) -> dict:
    state = mpu.current()
    return {"world": dist.get_world_size(), "tp": state.tp.size, "pp": state.pp.size,
            "cp": state.cp.size, "dp": state.dp.size, "zero": cfg.zero}


def save(cfg: TrainConfig, parts, step: int, loader, losses: dict[int, float]) -> str:
    """Checkpoint the state after ``step`` steps (a collective); returns its folder."""
    folder = os.path.join(cfg.checkpoint_dir, f"step_{step:07d}")
    checkpoint.save_checkpoint(folder, parts.model, extra=_state(parts, step, loader, losses))
    if dist.get_rank() == 0:
        _write_latest(cfg, step, folder)
        _prune(cfg.checkpoint_dir, cfg.keep_checkpoints, keep=folder)
    dist.barrier()  # a resume in this process group reads latest.json
    return folder


def load_latest(cfg: TrainConfig, parts, loader) -> tuple[int, dict[int, float]] | None:
    """Restore the latest checkpoint of ``cfg.checkpoint_dir``; returns (steps done, losses),
    or None when there is none (a fresh start). ``loader`` (a ``data.BatchLoader``) must be at
    the saved data position after the saved step."""
    if not (cfg.resume and cfg.checkpoint_dir):
        return None
    latest = _read_latest(cfg.checkpoint_dir)
    if latest is None:
        return None
    _check_same_run(cfg, latest)
    template = _state(parts, 0, loader, {})
    loaded = checkpoint.load_checkpoint(os.path.join(cfg.checkpoint_dir, latest["folder"]),
                                        parts.model, extra=template)
    trainer = loaded["trainer"]
    if trainer["data"] != _data_position(loader, trainer["step"]):
        raise ValueError(f"the checkpoint's data position after step {trainer['step']} is "
                         f"{trainer['data']}, but this run's data would be at "
                         f"{_data_position(loader, trainer['step'])}: the data source changed "
                         "(another file or length); resume with the data it was saved with")
    parts.scheduler.load_state_dict(trainer["scheduler"])
    for group, lr in zip(parts.optimizer.param_groups, parts.scheduler.get_last_lr()):
        group["lr"] = lr  # LambdaLR.load_state_dict leaves the optimizer's LR as it was built
    if parts.optimizer.grad_scaler is not None:
        parts.optimizer.grad_scaler.load_state_dict(trainer["grad_scaler"])
    rng = loaded["rng"][f"rank{dist.get_rank()}"]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    get_rng_tracker().set_states(rng["tracker"])
    return trainer["step"], dict(trainer["losses"])


def _state(parts, step: int, loader, losses: dict[int, float]) -> dict:
    """Everything but the model, as ``save_checkpoint``'s ``extra`` (and the load template)."""
    state = mpu.current()
    key = f"pp{state.pp.rank}_tp{state.tp.rank}"
    if parts.ddp.use_distributed_optimizer:
        key += f"_dpcp{state.dp_cp.rank}"
    scaler = parts.optimizer.grad_scaler
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {
        "optimizer": {key: optimizer_tensors(parts.optimizer, parts.ddp)},
        "trainer": {"step": step, "data": _data_position(loader, step),
                    "scheduler": parts.scheduler.state_dict(),
                    "grad_scaler": None if scaler is None else scaler.state_dict(),
                    "losses": sorted(losses.items())},
        "rng": {f"rank{dist.get_rank()}": {"cpu": torch.get_rng_state(), "cuda": cuda,
                                           "tracker": get_rng_tracker().get_states()}},
    }


def _data_position(loader, step: int) -> dict:
    epoch, consumed = loader.position(step)
    return {"epoch": epoch, "samples_in_epoch": consumed,
            "samples_per_epoch": loader.source.num_samples}


def optimizer_tensors(optimizer, ddp) -> dict:
    """The inner AdamW's state per master (index order) and the masters that are not model
    parameters (fp32 copies of bf16/fp16 weights, ZeRO shards): live tensors, so a load fills
    them in place. State an optimizer has not made yet (before its first step) is made here."""
    inner = optimizer.optimizer
    model_params = {id(p) for p in ddp.bucketed_parameters()}
    out = {}
    for i, master in enumerate(p for group in inner.param_groups for p in group["params"]):
        state = inner.state[master]
        if not state:
            state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(master),
                         exp_avg_sq=torch.zeros_like(master))
        entry = dict(state)
        if id(master) not in model_params:
            entry["master"] = master.detach()
        out[str(i)] = entry
    return out


def _write_latest(cfg: TrainConfig, step: int, folder: str) -> None:
    record = {"step": step, "folder": os.path.basename(folder), "layout": layout_of(cfg),
              "run": run_identity(cfg)}
    path = os.path.join(cfg.checkpoint_dir, LATEST)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _read_latest(checkpoint_dir: str) -> dict | None:
    try:
        with open(os.path.join(checkpoint_dir, LATEST)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _check_same_run(cfg: TrainConfig, latest: dict) -> None:
    where = os.path.join(cfg.checkpoint_dir, latest["folder"])
    if latest["layout"] != layout_of(cfg):
        raise ValueError(f"the latest checkpoint {where!r} was saved at {latest['layout']}, this "
                         f"run is {layout_of(cfg)}: resume at the saved layout (the weights "
                         "alone load at any layout with parallelkit.checkpoint.load_checkpoint)")
    now = json.loads(json.dumps(run_identity(cfg)))  # tuples as JSON lists, as saved
    changed = {k: (latest["run"].get(k), now[k]) for k in now if latest["run"].get(k) != now[k]}
    if changed:
        raise ValueError(f"the latest checkpoint {where!r} is of another run: "
                         + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items())
                         + "; use another checkpoint_dir, or resume=False to start afresh")


def _prune(checkpoint_dir: str, keep_last: int, keep: str) -> None:
    """Remove all but the newest ``keep_last`` step folders (never ``keep``)."""
    folders = sorted(f for f in os.listdir(checkpoint_dir)
                     if f.startswith("step_") and f[5:].isdigit())
    for name in folders[:-keep_last]:
        path = os.path.join(checkpoint_dir, name)
        if os.path.abspath(path) == os.path.abspath(keep):
            continue
        try:  # first, so that a removal cut short never leaves a folder that looks complete
            os.remove(os.path.join(path, METADATA))
        except FileNotFoundError:
            pass
        shutil.rmtree(path, ignore_errors=True)
