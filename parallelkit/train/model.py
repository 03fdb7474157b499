"""The model of a run and what trains it: built from a config in code (nothing is downloaded),
converted by ``parallelize`` for TP x CP, split into pipeline stages when pp > 1, wrapped for DP,
with its optimizer and LR schedule; and its training FLOPs per token, for the MFU.

Models: "tinylm" (the repo's sequence-first GPT, the one the pipeline runs), "llama-tiny" (a
small transformers Llama), or a transformers ``config.json`` (any family ``parallelize``
converts; pp = 1). Precision: the weights are cast to fp32/bf16/fp16 before wrapping; the DP
wrapper keeps fp32 ``main_grad`` buckets for bf16/fp16, and the optimizer steps fp32 masters
(``MixedPrecisionOptimizer``, or ZeRO-1's ``DistributedOptimizer``), with dynamic loss scaling
for fp16. fp32 weights are their own masters, so every precision takes the same path.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallelkit.train.config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINYLM_DEFAULTS = dict(vocab=256, hidden=64, heads=4, ffn=256, layers=4)
LLAMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class ModelSpec:
    kind: str      # "tinylm" or "transformers"
    config: Any    # a TinyConfig or a transformers PretrainedConfig
    vocab: int
    hidden: int
    layers: int


def model_spec(cfg: TrainConfig) -> ModelSpec:
    """What ``cfg.model`` and ``cfg.model_args`` describe; refuses what the layout cannot run."""
    if cfg.model == "tinylm":
        from parallelkit.models.tinylm import TinyConfig

        fields = set(TinyConfig.__dataclass_fields__)
        unknown = sorted(set(cfg.model_args) - fields)
        if unknown:
            raise ValueError(f"model_args {unknown} are not TinyConfig fields {sorted(fields)}")
        tiny = TinyConfig(**{**TINYLM_DEFAULTS, **cfg.model_args})
        return ModelSpec("tinylm", tiny, tiny.vocab, tiny.hidden, tiny.layers)
    if cfg.pp > 1:
        raise ValueError(f"pp={cfg.pp} runs model='tinylm' only: the pipeline splits a stack of "
                         "sequence-first blocks, and transformers models are not split into "
                         f"stages by this package; use pp=1 for {cfg.model!r}")
    config = _transformers_config(cfg)
    return ModelSpec("transformers", config, config.vocab_size, config.hidden_size,
                     config.num_hidden_layers)


def _transformers_config(cfg: TrainConfig):
    """The config, with ``model_args`` given to its constructor (so that derived sizes such as
    ``head_dim`` follow them)."""
    from parallelkit.models.shrink import load_config

    if cfg.model == "llama-tiny":
        raw = {"model_type": "llama", **LLAMA_TINY, "max_position_embeddings": cfg.seq}
    elif cfg.model.endswith(".json"):
        load_config(cfg.model)  # an unreadable or invalid file: load_config's clear error
        raw = _read_json(cfg.model)
    else:
        raise ValueError(f"model={cfg.model!r} is neither a built-in ('tinylm', 'llama-tiny') "
                         "nor a path to a transformers config.json")
    known = load_config(raw).to_dict()
    unknown = sorted(set(cfg.model_args) - set(known))
    if unknown:
        raise ValueError(f"model_args {unknown} are not fields of the {known['model_type']} "
                         "config")
    config = load_config({**raw, **cfg.model_args, "use_cache": False,
                          "attn_implementation": "sdpa"})
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.seq > limit:
        raise ValueError(f"seq={cfg.seq} is longer than the model's max_position_embeddings="
                         f"{limit}; shorten seq or pass model_args max_position_embeddings")
    return config


def _read_json(path: str) -> dict:
    import json

    with open(path) as f:
        return json.load(f)


def build_dense(spec: ModelSpec, seed: int) -> nn.Module:
    """The whole model in float32, the same weights on every rank."""
    torch.manual_seed(seed)
    if spec.kind == "tinylm":
        from parallelkit.models.tinylm import TinyLM

        return TinyLM(spec.config)
    import transformers

    return transformers.AutoModelForCausalLM.from_config(spec.config)


def flops_per_token(model: nn.Module, spec: ModelSpec, seq: int) -> float:
    """Training FLOPs per token (PaLM's appendix B): ``6 N`` for the matmuls of forward and
    backward, N the parameters less the input embedding (a lookup, unless tied to the head),
    plus ``12 L h s`` for the attention scores and their use (non-causal count, as PaLM's)."""
    embedding = model.get_input_embeddings().weight if spec.kind == "transformers" \
        else model.embed.weight
    tied = any(p is embedding for name, p in model.named_parameters(remove_duplicate=False)
               if "embed" not in name)
    n = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())
    return 6.0 * n + 12.0 * spec.layers * spec.hidden * seq


class TokenLoss:
    """The pipeline's loss of one micro-batch: mean cross-entropy of TinyLM's logits
    ``[s, b, V]`` against labels ``[s, b]``, times the loss scale (fp16) the optimizer sets."""

    def __init__(self):
        self.scale_loss = lambda loss: loss

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.scale_loss(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()))


@dataclass
class Parts:
    """What one rank trains. ``model`` holds only this rank's parameters (on a pipeline rank the
    other stages' modules are replaced by ``nn.Identity``), under the whole model's names."""

    spec: ModelSpec
    model: nn.Module
    ddp: Any                 # DistributedDataParallel
    optimizer: Any           # MixedPrecisionOptimizer or DistributedOptimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stage: Any               # PipelineStage, or None when pp = 1
    flops_per_token: float


def build(cfg: TrainConfig, device: torch.device) -> Parts:
    from parallelkit.data_parallel import (DistributedDataParallel, DistributedOptimizer,
                                           MixedPrecisionOptimizer)
    from parallelkit.parallelize import parallelize
    from parallelkit.tensor_parallel.random import model_parallel_seed

    spec = model_spec(cfg)
    dense = build_dense(spec, cfg.seed)
    flops = flops_per_token(dense, spec, cfg.seq)
    # The pipeline's stages pass whole [s, b, h] activations: no sequence-parallel split.
    sequence_parallel = False if cfg.pp > 1 else cfg.sequence_parallel
    model = parallelize(dense.to(DTYPES[cfg.precision]), sequence_parallel=sequence_parallel,
                        recompute=cfg.recompute).to(device)
    stage = loss = None
    if cfg.pp > 1:
        from parallelkit.pipeline_parallel import PipelineStage

        loss = TokenLoss()
        stage = PipelineStage.from_layers(model.blocks, loss, pre=model.embed,
                                          post=nn.Sequential(model.ln_f, model.lm_head))
        keep_only(model, {id(p) for p in stage.parameters()})
    ddp = DistributedDataParallel(model, use_distributed_optimizer=cfg.zero)
    params = list(ddp.bucketed_parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    wrapper = DistributedOptimizer if cfg.zero else MixedPrecisionOptimizer
    optimizer = wrapper(ddp, torch.optim.AdamW, groups, lr=cfg.lr, betas=tuple(cfg.betas),
                        eps=cfg.eps, weight_decay=cfg.weight_decay)
    if loss is not None:
        loss.scale_loss = optimizer.scale_loss
    schedule = functools.partial(lr_factor, warmup=cfg.warmup_steps, steps=cfg.steps,
                                 min_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, schedule)
    model_parallel_seed(cfg.seed)  # dropout: the default stream alike on TP ranks, and the TP one
    return Parts(spec, model, ddp, optimizer, scheduler, stage, flops)


def lr_factor(done: int, warmup: int, steps: int, min_ratio: float) -> float:
    """The LR multiplier for the step after ``done`` steps: linear warm-up over ``warmup``
    steps, then a cosine from 1 down to ``min_ratio`` at ``steps``."""
    if done < warmup:
        return (done + 1) / warmup
    progress = min(1.0, (done - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def keep_only(module: nn.Module, held: set[int]) -> None:
    """Replace every submodule none of whose parameters is in ``held`` by ``nn.Identity``, so
    that ``module`` names exactly this pipeline rank's parameters (what it saves)."""
    for name, child in list(module.named_children()):
        params = list(child.parameters())
        if params and not any(id(p) in held for p in params):
            setattr(module, name, nn.Identity())
        else:
            keep_only(child, held)
