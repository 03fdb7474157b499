"""Parallel styles: how one module of a plan is converted, as small classes (in the spirit of
``torch.distributed.tensor.parallel``'s ``ParallelStyle``).

A plan maps module-name patterns to style instances. A style reads the conversion's options
(:class:`ParallelOptions`: sequence parallelism, fused overlap, vocab-parallel loss) from the
:class:`Conversion` it is applied in, so one plan serves every combination of options:

    ColwiseParallel()            nn.Linear → ColumnParallelLinear (output features split)
    ColwiseParallel(parts=[q, k, v])   a fused projection whose output is [part | part | ...]:
                                 each rank keeps its slice of every part (its heads of q, k and v)
    RowwiseParallel()            nn.Linear → RowParallelLinear(input_is_parallel=True)
    VocabParallel()              nn.Embedding → VocabParallelEmbedding (a scale kept if the
                                 embedding multiplies its output by ``embed_scale``)
    LMHead()                     the output projection: vocabulary split; logits gathered unless
                                 loss_parallel keeps them sharded for the vocab-parallel loss
    SequenceParallelNorm()       a norm over the full hidden dim: under sequence parallelism it
                                 sees 1/tp of the tokens, so its parameters are marked for the
                                 gradient sum over TP
    Replicated()                 any other module left whole that acts on each token alone (a
                                 mixture-of-experts block): marked the same way
    PerHeadNorm()                a norm over the head dim (Qwen3's q/k norms): its gradient is
                                 a partial sum over the ranks' heads, summed over TP
    ShardedNorm()                a norm over a column layer's whole (sharded) output (OLMo-2's
                                 q/k norms) → ParallelRMSNorm / ParallelLayerNorm, statistics
                                 summed over TP
    SequenceParallelEntry()      the first decoder layer: its input is split along the sequence
                                 (a plan with one supports sequence parallelism)
    SequenceParallelExit()       a final norm whose output is gathered again (for models that
                                 reshape it assuming the whole sequence), before an
                                 ``LMHead(sequence_parallel=False)``
    ParallelRegion()             a module that starts with column layers and ends with row
                                 layers (attention, MLP): under sequence parallelism its input is
                                 gathered once on entry, fused into its column matmuls with
                                 overlap_comm (``tensor_parallel/region.py``)
    ContextParallel()            a module called as attention(q, k, v, is_causal=...) →
                                 ContextParallelAttention
    ExpertParallel()             transformers' experts module (3-D gate_up_proj / down_proj) →
                                 ExpertParallelExperts over the MPU's expert groups

transformers' ``Conv1D`` (GPT-2's ``x W + b``, W stored [in, out]) is accepted wherever
nn.Linear is and converted to the Linear computing the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.context_parallel import ContextParallelAttention
from parallelkit.distributed import mappings
from parallelkit.distributed.context_layout import LAYOUTS
from parallelkit.distributed.groups import bind_group
from parallelkit.tensor_parallel import (ColumnParallelLinear, ParallelLayerNorm,
                                         ParallelRMSNorm, RowParallelLinear,
                                         VocabParallelEmbedding, mark_sequence_parallel)
from parallelkit.tensor_parallel.region import install_region


@dataclass(frozen=True)
class ParallelOptions:
    """What a conversion turns on. The defaults are the fastest correct choice at tp > 1."""

    sequence_parallel: bool = True   # activations between TP regions split along the sequence
    overlap_comm: bool = True        # the fused ring matmuls (needs sequence_parallel)
    loss_parallel: bool = True       # the LM head keeps its vocabulary shard for the loss
    cp_layout: str = "zigzag"        # token order of context parallelism
    chunks_per_rank: int = 1         # pieces per rank in the fused ring matmuls

    def __post_init__(self):
        if self.overlap_comm and not self.sequence_parallel:
            raise ValueError("overlap_comm=True fuses the sequence-parallel collectives into the "
                             "matmuls: it needs sequence_parallel=True")
        if self.cp_layout not in LAYOUTS:
            raise ValueError(f"cp_layout={self.cp_layout!r} must be one of {LAYOUTS}")


@dataclass
class Conversion:
    """One ``parallelize`` call: groups (None = the MPU's, bound at construction), sizes,
    options, and where the model keeps its sequence dim."""

    tp_group: dist.ProcessGroup | None
    cp_group: dist.ProcessGroup | None
    tp: int
    cp: int
    options: ParallelOptions
    sequence_dim: int = 1  # Hugging Face models are batch-first [b, s, h]

    @property
    def sequence_parallel(self) -> bool:
        return self.options.sequence_parallel and self.tp > 1

    def linear_kwargs(self) -> dict:
        sp = self.sequence_parallel
        return dict(sequence_parallel=sp, overlap_comm=sp and self.options.overlap_comm,
                    chunks_per_rank=self.options.chunks_per_rank, tp_group=self.tp_group,
                    sequence_dim=self.sequence_dim)


class ParallelStyle:
    """Converts one module; ``apply`` returns its replacement (or the module, changed)."""

    needs = "tp"  # the group size that must be > 1 for the style to do anything

    def apply(self, module: nn.Module, conversion: Conversion) -> nn.Module:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class ColwiseParallel(ParallelStyle):
    """Output features split. ``parts``: the sizes of a fused projection's output blocks
    ([q | k | v], [gate | up]), or their number when equal, each split across ranks so a rank
    keeps its slice of every block. (GPT-NeoX's per-head [head: q k v] layout needs none.)"""

    def __init__(self, parts: list[int] | int | None = None):
        self.parts = parts

    def apply(self, module, conversion):
        linear = as_linear(module)
        if self.parts is not None:
            parts = self.parts
            if isinstance(parts, int):
                parts = [linear.out_features // parts] * parts
            linear = _interleave_parts(linear, parts, conversion.tp)
        return ColumnParallelLinear.from_dense(linear, **conversion.linear_kwargs())


class RowwiseParallel(ParallelStyle):
    """Input features split; the input is a column-parallel output."""

    def apply(self, module, conversion):
        return RowParallelLinear.from_dense(as_linear(module), input_is_parallel=True,
                                            **conversion.linear_kwargs())


class VocabParallel(ParallelStyle):
    """Vocabulary rows split. The output stays whole (an all-reduce): Hugging Face models size
    their masks and positions from it; the first layer's input is split for sequence
    parallelism instead (see :class:`SequenceParallelEntry`)."""

    def apply(self, module, conversion):
        scale = getattr(module, "embed_scale", None)
        if type(module) is not nn.Embedding and scale is None:
            raise TypeError(f"{type(module).__name__} is an nn.Embedding subclass with its own "
                            "forward; VocabParallel converts plain nn.Embedding (or one that "
                            "multiplies by embed_scale): give its family plan a style for it")
        layer = VocabParallelEmbedding.from_dense(_plain_embedding(module),
                                                  tp_group=conversion.tp_group)
        if scale is not None:
            layer.register_buffer("embed_scale", scale.detach().clone(), persistent=False)
            layer.register_forward_hook(lambda m, args, out: out * m.embed_scale.to(out.dtype))
        return layer


class LMHead(ParallelStyle):
    """The output projection. Logits ``[b, s, V/tp]`` under loss_parallel while a loss is being
    computed (see ``parallelize``), else gathered to ``[b, s, V]``. Under sequence parallelism
    it gathers the sequence itself (fused with overlap_comm), unless ``sequence_parallel=False``
    says a :class:`SequenceParallelExit` before it has gathered it already."""

    def __init__(self, sequence_parallel: bool = True):
        self.sequence_parallel = sequence_parallel

    def apply(self, module, conversion):
        kwargs = conversion.linear_kwargs()
        if not self.sequence_parallel:
            kwargs.update(sequence_parallel=False, overlap_comm=False)
        head = ColumnParallelLinear.from_dense(as_linear(module), gather_output=True, **kwargs)
        head.is_lm_head = True  # parallelize turns gather_output off around a loss's forward
        return head


class Replicated(ParallelStyle):
    """A module left whole on every rank in the residual stream, acting on each token alone (a
    norm, a mixture-of-experts block with its router): under sequence parallelism it sees this
    rank's tokens only, so its parameters' gradients are partial sums over TP (summed by the
    sequence-parallel gradient hooks)."""

    def apply(self, module, conversion):
        if conversion.sequence_parallel:
            mark_sequence_parallel(*module.parameters())
        return module


class SequenceParallelNorm(Replicated):
    """A norm over the full hidden dim in the residual stream (see :class:`Replicated`)."""


class SequenceParallelExit(SequenceParallelNorm):
    """The final norm of a model that reshapes its output assuming the whole sequence (GPT-2
    views it as ``[-1, s, h]``): a sequence-parallel norm whose output is gathered along the
    sequence, for an ``LMHead(sequence_parallel=False)`` after it. (Backward: the head's
    gradient is whole on every rank, so each keeps its part.)"""

    def apply(self, module, conversion):
        module = super().apply(module, conversion)
        if conversion.sequence_parallel:
            bound, dim = bind_group(conversion.tp_group, "tp"), conversion.sequence_dim

            def gather(norm, args, output):
                return mappings.gather_from_sp_region(output, bound.group, tp_output_grad=False,
                                                      dim=dim)

            module.register_forward_hook(gather)
        return module


class PerHeadNorm(ParallelStyle):
    """A norm over the head dim applied to every head (Qwen3's q/k norms): it stays as it is,
    but each rank applies it to its own heads only, so its weight's gradient is a partial sum
    over TP, summed by the same hooks as sequence-parallel norms."""

    def apply(self, module, conversion):
        mark_sequence_parallel(*module.parameters())
        return module


class ShardedNorm(ParallelStyle):
    """A norm over an activation whose features are split across TP (a column layer's output):
    each rank holds a slice of every row, so the statistics are summed over TP
    (ParallelRMSNorm / ParallelLayerNorm keep this rank's slice of the weight)."""

    def apply(self, module, conversion):
        if isinstance(module, nn.LayerNorm):
            return ParallelLayerNorm.from_dense(module, tp_group=conversion.tp_group)
        return ParallelRMSNorm.from_dense(as_rms_norm(module), tp_group=conversion.tp_group)


class SequenceParallelEntry(ParallelStyle):
    """The first layer of the TP region: under sequence parallelism its input is split along
    the sequence (backward: gathered), so the residual stream holds 1/tp of the tokens."""

    def apply(self, module, conversion):
        if conversion.sequence_parallel:
            bound, dim = bind_group(conversion.tp_group, "tp"), conversion.sequence_dim

            def split(layer, args, kwargs):
                bound.check(layer)
                if args:
                    return (mappings.scatter_to_sp_region(args[0], bound.group, dim=dim),
                            *args[1:]), kwargs
                kwargs["hidden_states"] = mappings.scatter_to_sp_region(
                    kwargs["hidden_states"], bound.group, dim=dim)
                return args, kwargs

            module.register_forward_pre_hook(split, with_kwargs=True)
        return module


class ParallelRegion(ParallelStyle):
    """A module whose column layers take its input and whose row layers make its output (a
    transformers attention or MLP). Under sequence parallelism it receives this rank's tokens;
    its input is gathered along the sequence on entry, so the module runs on the whole sequence
    (its own shape arithmetic included), and its row layers reduce-scatter the output. Head
    counts the module keeps as attributes become this rank's."""

    # Head counts an attention module may keep for its own reshapes (StableLM views q as
    # [b, s, self.num_heads, d]): each rank has 1/tp of the heads.
    HEAD_COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads",
                   "n_heads", "n_head", "n_kv_heads")

    def apply(self, module, conversion):
        for attr in self.HEAD_COUNTS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                if value % conversion.tp:
                    raise ValueError(f"{type(module).__name__}.{attr} = {value} is not divisible "
                                     f"by tp={conversion.tp}: each rank must hold whole heads")
                setattr(module, attr, value // conversion.tp)
        if conversion.sequence_parallel:
            install_region(module, tp_group=conversion.tp_group,
                           sequence_dim=conversion.sequence_dim,
                           overlap_comm=conversion.options.overlap_comm,
                           chunks_per_rank=conversion.options.chunks_per_rank)
        return module


class ExpertParallel(ParallelStyle):
    """transformers' experts module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I],
    called as ``experts(tokens, top_k_index, top_k_weights)``) → :class:`ExpertParallelExperts`:
    each rank keeps E/ep experts, each split over etp, and tokens travel to them by all-to-all.
    With tp > 1 it needs sequence parallelism: every TP rank must route tokens of its own (the
    same tokens routed from every TP rank would reach the experts tp times, as Megatron
    requires)."""

    needs = "ep"  # the expert tensor x model group: ep x etp

    def apply(self, module, conversion):
        from parallelkit.moe import ExpertParallelExperts

        if conversion.tp > 1 and not conversion.sequence_parallel:
            raise ValueError(f"{type(module).__name__}: mixture-of-experts layers at tp="
                             f"{conversion.tp} need sequence parallelism (each TP rank routes "
                             "its own tokens); convert with sequence_parallel=True (the "
                             "default for the built-in plans)")
        return ExpertParallelExperts.from_dense(module)


class ContextParallel(ParallelStyle):
    """A module called as ``attention(q, k, v, is_causal=...)`` → ContextParallelAttention."""

    needs = "cp"

    def apply(self, module, conversion):
        return ContextParallelAttention(conversion.cp_group, conversion.options.cp_layout)


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as a plain nn.Linear: itself, or transformers' Conv1D re-expressed."""
    if type(module) is nn.Linear:
        return module
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return _linear_from(module.weight.detach().t(), module.bias.detach())
    raise TypeError(f"{type(module).__name__} is not an nn.Linear (subclasses with their own "
                    "forward are refused: converting them would drop what their forward adds)")


def as_rms_norm(module: nn.Module) -> nn.RMSNorm:
    """``module`` as an nn.RMSNorm: itself, or a transformers RMSNorm class (weight and
    ``variance_epsilon``/``eps``) after a probe shows it computes ``w * x / rms(x)`` (Gemma's
    ``(1 + w)`` form, for one, does not and is refused)."""
    if isinstance(module, nn.RMSNorm) and type(module).forward is nn.RMSNorm.forward:
        return module
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if weight is None or weight.dim() != 1 or eps is None:
        raise TypeError(f"{type(module).__name__} is not an RMSNorm this style can convert (it "
                        "needs a 1-D weight and variance_epsilon or eps); give the plan a style "
                        "for it")
    norm = nn.RMSNorm(weight.shape[0], eps=eps, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        norm.weight.copy_(weight)
        probe = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0),
                            dtype=torch.float32).to(weight)
        # transformers' norms compute in float32: compare at float32's resolution
        same = torch.allclose(module(probe).float(), norm(probe).float(), rtol=1e-4, atol=1e-5)
    if not same:
        raise TypeError(f"{type(module).__name__} does not compute weight * x / rms(x) (probed "
                        "on a fixed input); ShardedNorm would change its output: give the plan "
                        "a style for it")
    return norm


def _interleave_parts(linear: nn.Linear, parts: list[int], tp: int) -> nn.Linear:
    """Reorder the output features [p_0 | p_1 | ...] to [p_0/r0 p_1/r0 ... | p_0/r1 ...] so a
    contiguous split of tp gives rank r its slice of every part."""
    if sum(parts) != linear.out_features:
        raise ValueError(f"parts {parts} sum to {sum(parts)}, but the projection has "
                         f"{linear.out_features} output features")
    bad = [p for p in parts if p % tp]
    if bad:
        raise ValueError(f"fused projection parts {parts}: {bad} not divisible by tp={tp}")

    def interleave(t):
        pieces = [part.chunk(tp, 0) for part in t.split(parts, 0)]
        return torch.cat([pieces[i][r] for r in range(tp) for i in range(len(parts))], 0)

    bias = None if linear.bias is None else interleave(linear.bias.detach())
    return _linear_from(interleave(linear.weight.detach()), bias)


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    # skip_init: a temporary must not draw from (and so shift) the caller's RNG stream.
    linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _plain_embedding(module: nn.Embedding) -> nn.Embedding:
    if type(module) is nn.Embedding:
        return module
    plain = nn.utils.skip_init(nn.Embedding, module.num_embeddings, module.embedding_dim,
                               module.padding_idx, dtype=module.weight.dtype,
                               device=module.weight.device)
    with torch.no_grad():
        plain.weight.copy_(module.weight)
    return plain
