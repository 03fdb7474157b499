"""What one training run is: :class:`TrainConfig`, and the checks that turn a bad one into one
clear error before any process group exists.

The layout is tp x cp x dp x pp over the world (dp inferred, Megatron's order); the global batch
is ``micro_batch x dp x accumulation`` sequences of ``seq`` tokens per optimizer step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTE = (None, "selective", "full")
DATA_DTYPES = ("uint16", "uint32")
# Fields that may change between a run and its resumption; any other change would make the
# resumed run another run (a different model, data order or schedule), so resume refuses it.
RESUMABLE_CHANGES = ("stop_after", "checkpoint_every", "keep_checkpoints", "resume", "plot",
                     "progress", "peak_tflops", "checkpoint_dir", "world")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (see ``python -m parallelkit train --help`` for each option).

    model: a built-in name ("tinylm", "llama-tiny") or a transformers config.json path;
        ``model_args`` overrides its fields (e.g. ``{"layers": 4, "dropout": 0.1}`` for TinyLM,
        ``{"num_hidden_layers": 4}`` for a transformers config).
    data: "synthetic" (tokens from ``seed``) or the path of a flat token file (nanoGPT's
        ``train.bin``: ``np.memmap(path, dtype=data_dtype)``).
    steps: the length of the run and of the LR schedule; ``stop_after`` ends this process early
        (after a checkpoint), as a preempted job would, and a later call resumes.
    """

    model: str = "tinylm"
    model_args: dict[str, Any] = field(default_factory=dict)
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    world: int | None = None            # local gloo ranks to fork; None: WORLD_SIZE or tp*pp*cp
    micro_batch: int = 1                # sequences per micro-batch per DP rank
    global_batch: int = 8               # sequences per optimizer step, all DP ranks together
    seq: int = 64
    precision: str = "fp32"
    zero: bool = False                  # ZeRO-1: DistributedOptimizer shards the state over DP
    recompute: str | None = None
    sequence_parallel: bool | None = None  # None: parallelize's default (on with tp > 1, pp = 1)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1           # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1           # on matrices and embeddings, not on norms and biases
    grad_clip: float | None = 1.0
    steps: int = 100
    stop_after: int | None = None
    data: str = "synthetic"
    data_dtype: str = "uint16"
    synthetic_samples: int = 4096       # samples in one epoch of synthetic data
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0           # 0: only at the end (and at stop_after)
    keep_checkpoints: int = 2
    resume: bool = True                 # continue from checkpoint_dir's latest checkpoint
    peak_tflops: float | None = None    # per device; None: measure a GEMM at start
    plot: str | None = None             # where to write the loss curve (PNG)
    progress: bool = True

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig(**{**asdict(self), **changes})


@dataclass(frozen=True)
class Shape:
    """The sizes a valid config implies."""

    world: int
    dp: int
    accumulation: int  # micro-batches per DP rank per step


def check(cfg: TrainConfig, world: int) -> Shape:
    """Every rule a config must meet on ``world`` ranks; raises ValueError naming the value."""
    _positive(cfg, "tp", "pp", "cp", "ep", "micro_batch", "global_batch", "seq", "steps",
              "synthetic_samples", "keep_checkpoints")
    if cfg.ep > 1:
        raise ValueError(f"ep={cfg.ep}: expert parallelism is not implemented in parallelkit "
                         "yet; use ep=1 (a mixture-of-experts model still trains with its experts "
                         "replicated over TP)")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r} must be one of {PRECISIONS}")
    if cfg.recompute not in RECOMPUTE:
        raise ValueError(f"recompute={cfg.recompute!r} must be one of {RECOMPUTE}")
    if cfg.data_dtype not in DATA_DTYPES:
        raise ValueError(f"data_dtype={cfg.data_dtype!r} must be one of {DATA_DTYPES}")
    model_parallel = cfg.tp * cfg.pp * cfg.cp
    if world % model_parallel:
        raise ValueError(f"world size {world} is not a multiple of tp*pp*cp = {cfg.tp}*{cfg.pp}*"
                         f"{cfg.cp} = {model_parallel}; dp is world / (tp*pp*cp)")
    dp = world // model_parallel
    per_micro = cfg.micro_batch * dp
    if cfg.global_batch % per_micro:
        raise ValueError(f"global_batch={cfg.global_batch} is not divisible by micro_batch x dp "
                         f"= {cfg.micro_batch} x {dp} = {per_micro}: gradient accumulation must "
                         f"be a whole number of micro-batches; use a global batch multiple of "
                         f"{per_micro}")
    if cfg.cp > 1 and cfg.seq % (2 * cfg.cp):
        raise ValueError(f"seq={cfg.seq} is not divisible by 2*cp = {2 * cfg.cp}: the zigzag "
                         "context-parallel split cuts each sequence into 2*cp equal chunks")
    if uses_sequence_parallel(cfg) and (cfg.seq // cfg.cp) % cfg.tp:
        raise ValueError(f"seq={cfg.seq} ({cfg.seq // cfg.cp} tokens per CP rank) is not "
                         f"divisible by tp={cfg.tp}: sequence parallelism splits each rank's "
                         "tokens over TP; choose seq a multiple of "
                         f"{cfg.tp * cfg.cp * (2 if cfg.cp > 1 else 1)} or sequence_parallel=False")
    if cfg.pp > 1 and cfg.cp > 1:
        raise ValueError(f"pp={cfg.pp} with cp={cfg.cp}: the pipeline runs with cp=1 only in "
                         "this package (its stages pass whole sequences); use one or the other")
    if cfg.pp > 1 and cfg.sequence_parallel:
        raise ValueError("sequence_parallel=True with pp > 1: the pipeline stages pass [s, b, h] "
                         "activations without the sequence-parallel split; leave it unset")
    if cfg.stop_after is not None and not 1 <= cfg.stop_after <= cfg.steps:
        raise ValueError(f"stop_after={cfg.stop_after} must be in [1, steps={cfg.steps}]")
    if cfg.checkpoint_every < 0 or cfg.warmup_steps < 0:
        raise ValueError("checkpoint_every and warmup_steps must be >= 0")
    if (cfg.checkpoint_every or cfg.stop_after) and not cfg.checkpoint_dir:
        raise ValueError("checkpoint_every / stop_after need checkpoint_dir (where to save)")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise ValueError(f"grad_clip={cfg.grad_clip} must be > 0 (or None: no clipping)")
    return Shape(world, dp, cfg.global_batch // per_micro)


def uses_sequence_parallel(cfg: TrainConfig) -> bool:
    if cfg.tp == 1 or cfg.pp > 1:
        return False
    return cfg.sequence_parallel is not False


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")


def run_identity(cfg: TrainConfig) -> dict:
    """The fields a resumed run must share with the run that saved (JSON-able)."""
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
