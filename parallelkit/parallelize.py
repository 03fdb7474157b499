"""``parallelize(model)``: convert an existing model in place for tensor, sequence and context
parallelism, with the fused overlap matmuls and the vocab-parallel loss.

    mpu.initialize(tp=2, cp=2)
    model = parallelize(LlamaForCausalLM(config))        # the family's plan, fastest options
    loss = model(input_ids, labels=labels).loss           # vocab-parallel cross-entropy

The plan comes from the model's family (``parallelkit.models``: Llama, Mistral, Qwen2, Qwen3,
Gemma, Phi-3, GPT-NeoX, GPT-2, TinyLM; the mixtures of experts Mixtral, Qwen2-MoE and
Qwen3-MoE, whose experts spread over the MPU's expert groups), else from the structural plan
that recognises a standard decoder, else from ``plan={module-name pattern: ParallelStyle}``
(``parallelkit.parallel_styles``; patterns are ``fnmatch``-ed against ``model.named_modules()``
names). Each matching module is replaced by its parallel version built with ``from_dense``,
which keeps this rank's shard of the existing weights, so the converted model computes what the
original did.

Guards: the head and key/value-head counts must divide tp; cp > 1 without context-parallel
attention installed is an error, as is an attention mask with padding under cp > 1; subclasses of
nn.Linear / nn.Embedding whose forward differs are refused unless a style handles them.

Under sequence parallelism the norms' gradients are partial sums over TP: ``parallelize``
registers hooks that sum them during backward (our DistributedDataParallel knows and skips them).
"""

from __future__ import annotations

import fnmatch
import warnings

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.context_parallel import ContextParallelAttention
from parallelkit.distributed.groups import bind_group
from parallelkit.models import Family, config_heads, family_of
from parallelkit.models.decoder import structural_plan
from parallelkit.parallel_styles import (ColwiseParallel, ContextParallel, Conversion, LMHead,
                                         ParallelOptions, ParallelRegion, ParallelStyle,
                                         RowwiseParallel, SequenceParallelEntry, VocabParallel)
from parallelkit.tensor_parallel import (ColumnParallelLinear, VocabParallelEmbedding,
                                         register_sequence_parallel_grad_hooks)
from parallelkit.recompute import MODES, apply_recompute
from parallelkit.tensor_parallel.cross_entropy import causal_lm_loss

# Plans written with the earlier string names still work.
STYLE_NAMES = {
    "colwise": ColwiseParallel, "rowwise": RowwiseParallel, "vocab": VocabParallel,
    "colwise_gather": LMHead, "cp_attention": ContextParallel,
    "conv1d_colwise": ColwiseParallel, "conv1d_rowwise": RowwiseParallel,
    "conv1d_qkv": lambda: ColwiseParallel(parts=3),
}


def parallelize(model: nn.Module, plan: dict | None = None, *,
                sequence_parallel: bool | None = None,
                overlap_comm: bool | None = None, loss_parallel: bool = True,
                cp_layout: str = "zigzag", chunks_per_rank: int = 1,
                recompute: str | None = None,
                tp_group: dist.ProcessGroup | None = None,
                cp_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Convert ``model`` in place for the TP and CP groups (default: the MPU's) and return it.

    Args:
        plan: {pattern: ParallelStyle or style name}; default: the family's or structural plan.
        sequence_parallel: split activations between TP regions along the sequence (norms and
            residuals on 1/tp of the tokens); default: on where the plan supports it (it has a
            SequenceParallelEntry; the built-in plans do). The sequence must divide by tp, and
            ``logits_to_keep`` (generation) is refused: convert with False for generation.
        overlap_comm: the fused ring matmuls (default: on with sequence parallelism).
        loss_parallel: the LM head keeps its vocabulary shard when a loss is computed
            (``model(ids, labels=...)``; logits are then ``[b, s, V/tp]``); without labels the
            logits are gathered.
        cp_layout: token order under context parallelism ("zigzag" or "contiguous"). Every rank
            feeds its own tokens in this order (``split_for_context_parallel``), their global
            ``position_ids`` (``context_parallel_positions``) and, for a loss, ``shift_labels``
            split the same way (the next token of a rank's last one lives on another rank).
        recompute: None, "selective" (each decoder layer's attention core) or "full" (each
            decoder layer) is recomputed in backward, every random stream replayed exactly
            (``parallelkit.recompute``).
    """
    if recompute not in MODES:
        raise ValueError(f"recompute={recompute!r} must be one of {MODES}")
    family = family_of(model)
    plan = _resolve_plan(model, plan, family)
    tp_bound = bind_group(tp_group, "tp")
    tp, cp = tp_bound.size, bind_group(cp_group, "cp").size
    _check_heads(model, family, tp)
    patterns = _patterns_by_module(model, plan)
    styles = {name: plan[pattern] for name, pattern in patterns.items()}
    sequence_parallel = _choose_sequence_parallel(model, styles, sequence_parallel, tp)
    options = ParallelOptions(sequence_parallel, sequence_parallel if overlap_comm is None
                              else overlap_comm, loss_parallel, cp_layout, chunks_per_rank)
    conversion = Conversion(tp_group, cp_group, tp, cp, options,
                            family.sequence_dim if family else 1)

    modules = dict(model.named_modules())
    sizes = {"tp": tp, "cp": cp, "ep": _expert_model_parallel_size(styles)}
    for name, style in styles.items():
        if sizes[style.needs] > 1:
            _replace(model, name, style.apply(modules[name], conversion))
    used = set(patterns.values())
    unused = [p for p in plan if p not in used]
    if unused:
        raise ValueError(f"plan pattern(s) {unused} matched no module of "
                         f"{type(model).__name__}; check the names in model.named_modules()")
    if family is not None and family.after_conversion is not None and tp > 1:
        family.after_conversion(model, conversion)
    if cp > 1:
        _install_context_parallel(model, family, conversion)
    _tie_weights(model)
    if tp > 1:  # norms under SP, per-head norms always: their gradients are partial over TP
        register_sequence_parallel_grad_hooks(model, tp_bound.group)
    if conversion.sequence_parallel:
        model.register_forward_pre_hook(_refuse_partial_logits, with_kwargs=True)
    if options.loss_parallel and tp > 1:
        _use_vocab_parallel_loss(model, conversion)
    if recompute is not None:  # last: it wraps the attention implementation CP installed
        apply_recompute(model, recompute)
    return model


def _expert_model_parallel_size(styles: dict) -> int:
    """ep x etp of the MPU where the plan has expert styles (1 without them)."""
    if not any(style.needs == "ep" for style in styles.values()):
        return 1
    from parallelkit import mpu

    if not mpu.is_initialized():
        raise ValueError("the plan has expert-parallel styles but parallelkit.mpu is not "
                         "initialized: call mpu.initialize(tp=..., ep=...) first")
    return mpu.current().info("expert_tp_ep").size


def _resolve_plan(model: nn.Module, plan: dict | None, family: Family | None) -> dict:
    if plan is None:
        if family is not None:
            return family.plan(model)
        if not hasattr(model, "get_input_embeddings"):
            raise ValueError(f"no built-in plan for {type(model).__name__}; pass "
                             "plan={module-name pattern: style} with styles from "
                             "parallelkit.parallel_styles")
        return structural_plan(model)
    resolved = {}
    for pattern, style in plan.items():
        if isinstance(style, str):
            if style not in STYLE_NAMES:
                raise ValueError(f"unknown parallel style(s) [{style!r}]; use a ParallelStyle "
                                 f"or one of {sorted(STYLE_NAMES)}")
            style = STYLE_NAMES[style]()
        if not isinstance(style, ParallelStyle):
            raise TypeError(f"plan[{pattern!r}] is {style!r}, not a ParallelStyle")
        resolved[pattern] = style
    return resolved


def _choose_sequence_parallel(model: nn.Module, styles: dict, requested: bool | None,
                              tp: int) -> bool:
    """Sequence parallelism where the plan supports it and no parameter would be silently
    wrong under it. A parameter of the decoder stack that no style places runs on this rank's
    tokens under sequence parallelism, so its gradient would be a partial sum nobody completes:
    by default sequence parallelism is then off (with a warning), on request an error. One
    inside a parallel region may act on a TP-sharded activation: always an error at tp > 1.
    ``styles``: {module name: its style}, as the plan matched them."""
    name = type(model).__name__
    in_region, per_token = _unplaced_parameters(model, styles)
    if in_region and tp > 1:
        raise ValueError(f"{name}: the plan places no style on {_some(in_region)} inside a "
                         "ParallelRegion, whose activations are split across TP (heads or "
                         "features): give its module a style (PerHeadNorm, ShardedNorm, "
                         "ColwiseParallel, ...)")
    splits = any(isinstance(style, SequenceParallelEntry) for style in styles.values())
    if requested and not splits:
        raise ValueError(f"sequence_parallel=True, but the plan for {name} has no "
                         "SequenceParallelEntry (where the sequence split starts) and so does "
                         "not support it: add one, with ParallelRegion on the modules that "
                         "call the column layers, or pass sequence_parallel=False")
    if requested and per_token and tp > 1:
        raise ValueError(f"sequence_parallel=True, but the plan for {name} places no style on "
                         f"{_some(per_token)}: under sequence parallelism they would see 1/tp of "
                         "the tokens and their gradients would be partial. If their module acts "
                         "on each token alone (a mixture of experts), give it Replicated() in "
                         "the plan; else pass sequence_parallel=False")
    if requested is None and splits and per_token and tp > 1:
        warnings.warn(f"parallelize({name}): sequence parallelism is off, because the plan "
                      f"places no style on {_some(per_token)} (see Replicated() to turn it on)",
                      stacklevel=3)
        return False
    return splits if requested is None else requested


def _patterns_by_module(model: nn.Module, plan: dict) -> dict:
    """{module name: the first plan pattern it matches}, in ``model.named_modules()`` order."""
    patterns = {}
    for name, _ in model.named_modules():
        pattern = next((p for p in plan if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            patterns[name] = pattern
    return patterns


def _unplaced_parameters(model: nn.Module, styles: dict) -> tuple[list[str], list[str]]:
    """Parameters that no style converts or marks (the styles of their module or its ancestors,
    regions and the sequence entry aside): (those inside a ParallelRegion, those elsewhere in
    the decoder stack, the ModuleList whose first layer is the SequenceParallelEntry)."""
    entry = next((n for n, style in styles.items() if isinstance(style, SequenceParallelEntry)),
                 None)
    stack = entry.rpartition(".")[0] + "." if entry else None
    structural = (ParallelRegion, SequenceParallelEntry)
    in_region, per_token = [], []
    for pname, _ in model.named_parameters():
        parts = pname.split(".")[:-1]
        own = [styles[a] for a in (".".join(parts[:i]) for i in range(len(parts) + 1))
               if a in styles]
        if any(not isinstance(style, structural) for style in own):
            continue
        if any(isinstance(style, ParallelRegion) for style in own):
            in_region.append(pname)
        elif stack and pname.startswith(stack):
            per_token.append(pname)
    return in_region, per_token


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more parameters" if len(names) > 3 else "")


def _check_heads(model: nn.Module, family: Family | None, tp: int) -> None:
    if family is not None:
        heads, kv_heads = family.heads(model)
    elif hasattr(getattr(model, "config", None), "num_attention_heads"):
        heads, kv_heads = config_heads(model)
    else:
        return
    for what, n in (("attention heads", heads), ("key/value heads", kv_heads)):
        if n % tp:
            raise ValueError(f"{type(model).__name__} has {n} {what}, not divisible by tp={tp}: "
                             "tensor parallelism gives each rank whole heads; choose a tp that "
                             f"divides {n}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("a plan pattern matched the model itself; match its submodules")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _tie_weights(model: nn.Module) -> None:
    """Models that tie their LM head to the embedding share one shard after conversion (both
    split the vocabulary rows the same way)."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False):
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if isinstance(head, ColumnParallelLinear) and isinstance(embed, VocabParallelEmbedding):
            head.weight = embed.weight


def _install_context_parallel(model: nn.Module, family: Family | None,
                              conversion: Conversion) -> None:
    """cp > 1 must end with every attention context-parallel: a module the plan replaced, or
    transformers' attention interface routed to ours. Anything else is an error."""
    if any(isinstance(m, ContextParallelAttention) for m in model.modules()):
        return
    if not getattr(type(model), "_supports_attention_backend", False) or (
            family is not None and not family.attention_interface):
        raise ValueError(f"cp={conversion.cp} but no attention of {type(model).__name__} was made "
                         "context-parallel: its attention does not go through transformers' "
                         "attention interface; add ContextParallel() for its attention module "
                         "to the plan, or use cp=1")
    from parallelkit.context_parallel.hf_attention import use_context_parallel_attention

    use_context_parallel_attention(model, conversion.cp_group, conversion.options.cp_layout)


def _use_vocab_parallel_loss(model: nn.Module, conversion: Conversion) -> None:
    """``model(ids, labels=...)`` computes the vocab-parallel loss on sharded logits."""
    heads = [m for m in model.modules() if getattr(m, "is_lm_head", False)]
    if not heads or not hasattr(type(model), "loss_function"):
        return  # no converted LM head, or not a transformers model: logits stay gathered
    head, group = heads[0], conversion.tp_group

    def loss_function(logits, labels, vocab_size, **kwargs):
        return causal_lm_loss(logits, labels, tp_group=group, **kwargs)

    def before(module, args, kwargs):
        head.gather_output = kwargs.get("labels") is None

    def after(module, args, kwargs, output):
        head.gather_output = True

    model.loss_function = loss_function
    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


def _refuse_partial_logits(model, args, kwargs):
    keep = kwargs.get("logits_to_keep")
    if keep is not None and not (isinstance(keep, int) and keep == 0):
        raise ValueError(f"logits_to_keep={keep!r} (generation) under sequence parallelism: each "
                         "rank holds 1/tp of the positions, so 'the last ones' are not its own; "
                         "convert a model for generation with sequence_parallel=False")


def shard_batch(ids: torch.Tensor, cp_group: dist.ProcessGroup, dim: int,
                layout: str = "zigzag") -> torch.Tensor:
    """This CP rank's tokens of ``ids`` along the sequence ``dim`` (a convenience for callers)."""
    from parallelkit.context_parallel import split_for_context_parallel

    return split_for_context_parallel(ids, dist.get_rank(cp_group), dist.get_world_size(cp_group),
                                      dim=dim, layout=layout)
