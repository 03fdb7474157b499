"""Activation recomputation: keep a layer's inputs, not its activations, and run its forward again
in backward (Megatron's ``recompute_granularity``), with every random stream replayed exactly.

    apply_recompute(model, "full")        # each decoder layer: only its inputs are kept
    apply_recompute(model, "selective")   # each layer's attention core (softmax, its dropout)
    y = checkpoint(fn, x, w)              # any function (Megatron's tensor_parallel.checkpoint)

**The random streams.** A recomputed dropout must draw the mask the forward drew. torch's own
``preserve_rng_state`` restores the default CPU/CUDA generators only; dropout on TP-sharded
tensors draws from the tracker's per-rank stream (``tensor_parallel.random``), whose state lives
outside them. So :func:`checkpoint` snapshots *every* stream (CPU, each CUDA device, each tracker
stream) when the real forward starts; each recompute restores that snapshot, runs, then puts back
the snapshot taken just before it, so the live streams continue as if nothing was recomputed.

**The mechanism** is torch's non-reentrant checkpoint (``use_reentrant=False``) with those two
contexts, not Megatron's reentrant ``CheckpointFunction``: the recompute is triggered by autograd
unpacking a saved tensor, so it works with ``torch.autograd.grad(inputs=...)`` and with kwargs,
which the split backward of zero-bubble schedules needs (see "Pipelines" below).

**Where it applies.** ``full`` wraps each decoder layer's ``forward`` (the layers are the model's
longest ``nn.ModuleList``, as the structural plan finds them): hooks on the layer itself (the
sequence-parallel split of layer 0) stay outside and run once; hooks inside it (a parallel
region's all-gather, ring attention's exchanges) run again in the recompute, on every rank in the
same order, since every rank recomputes the same layers at the same point of its backward.
``selective`` recomputes the attention core, whose saved softmax ``[b, heads, s, s]`` is the
activation that grows with s²: a submodule named ``core_attention`` (Megatron's name; TinyLM's,
and ``ContextParallelAttention`` once CP replaced it), else each module whose ``forward`` calls
transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``): the model's configs are pointed
at an implementation that checkpoints the one it used (and uses its mask function).

**Pipelines.** 1F1B and the other schedules run one backward per micro-batch: one recompute.
ZB-H1's split backward runs B (input gradient) and later W (weight gradients) as separate
autograd calls over the same graph; torch frees a recomputed tensor once B has unpacked it and W
re-runs those nodes, so each recomputed region runs twice in backward: once in B, once in W
(W's calls share one recompute, ``backward_split``). Results are exact either way.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Callable, Iterable

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from parallelkit.tensor_parallel.random import restore_rng_snapshot, rng_snapshot

MODES = (None, "selective", "full")
IMPLEMENTATION = "parallelkit_recompute"  # prefix of the attention implementations registered
CACHE_ARGUMENTS = ("past_key_values", "layer_past")  # would be updated again by a recompute


def checkpoint(function: Callable, *args, **kwargs):
    """``function(*args, **kwargs)``, its activations dropped and recomputed in backward with
    every random stream replayed (module docstring). Without grad mode it just calls it."""
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    return torch_checkpoint.checkpoint(function, *args, use_reentrant=False,
                                       preserve_rng_state=False, context_fn=_replay_contexts,
                                       **kwargs)


class _AtForward:
    """Entered around the real forward: snapshots the streams it starts from."""

    def __init__(self):
        self.snapshot = None

    def __enter__(self):
        self.snapshot = rng_snapshot()

    def __exit__(self, exc_type, *exc):
        if exc_type is None and self.snapshot.cuda is None and torch.cuda.is_initialized():
            raise RuntimeError("CUDA was first initialised inside a recomputed forward, so its "
                               "random state cannot be replayed: initialise CUDA (move the model "
                               "or a tensor to the GPU) before the forward")
        return False


class _AtRecompute:
    """Entered around each recompute (B and W of a split backward each recompute): the
    forward's streams in, the live ones back out."""

    def __init__(self, at_forward: _AtForward):
        self.at_forward, self.live = at_forward, []

    def __enter__(self):
        self.live.append(rng_snapshot())
        restore_rng_snapshot(self.at_forward.snapshot)

    def __exit__(self, *exc):
        restore_rng_snapshot(self.live.pop())
        return False


def _replay_contexts():
    at_forward = _AtForward()
    return at_forward, _AtRecompute(at_forward)


def apply_recompute(model: nn.Module, mode: str | None, *,
                    layers: Iterable[nn.Module] | None = None) -> nn.Module:
    """Recompute ``layers`` (default: the decoder layers, the longest ``nn.ModuleList``) in
    backward: ``"full"`` each whole layer, ``"selective"`` each layer's attention core, None
    nothing. In place, parameter names unchanged; returns ``model``. Apply it after
    ``parallelize`` (which replaces modules) and before building pipeline stages."""
    if mode not in MODES:
        raise ValueError(f"recompute={mode!r} is not one of {list(MODES)}: None keeps every "
                         "activation, 'selective' recomputes the attention core, 'full' each "
                         "decoder layer")
    if mode is None:
        return model
    layers = _layers(model, layers)
    for layer in layers:
        _refuse_twice(layer)
    if mode == "full":
        for layer in layers:
            _wrap_forward(layer, drop_cache=True)
    else:
        cores = [_attention_cores(layer, index) for index, layer in enumerate(layers)]
        for core in (c for found in cores for c in found):
            if _calls_attention_interface(core):
                _use_recomputed_interface(core)
            else:
                _wrap_forward(core, drop_cache=False)
    for layer in layers:
        layer._parallelkit_recompute = mode
    return model


def _layers(model: nn.Module, layers) -> list[nn.Module]:
    if layers is None:
        from parallelkit.models.decoder import decoder_layers

        try:
            return list(decoder_layers(model)[1])
        except ValueError:
            raise ValueError(f"apply_recompute found no decoder layers in {type(model).__name__}"
                             ": it recomputes the modules of the longest nn.ModuleList, and there "
                             "is none; pass layers=[the modules to recompute]") from None
    layers, inside = list(layers), {id(m) for m in model.modules()}
    stray = [type(m).__name__ for m in layers if id(m) not in inside]
    if not layers or stray:
        raise ValueError(f"layers= must be non-empty submodules of {type(model).__name__}; got "
                         f"{len(layers)} module(s), {stray or 'none'} not inside the model")
    return layers


def _refuse_twice(layer: nn.Module) -> None:
    name = type(layer).__name__
    if getattr(layer, "_parallelkit_recompute", None):
        raise ValueError(f"{name} already has recompute={layer._parallelkit_recompute!r}; "
                         "apply_recompute once per model (rebuild it to change the mode)")
    if getattr(layer, "gradient_checkpointing", False):
        raise ValueError(f"{name} is already checkpointed by transformers "
                         "(activation_checkpointing_enable()), which replays no tracker stream: "
                         "call model.activation_checkpointing_disable() and use apply_recompute")


def _wrap_forward(module: nn.Module, drop_cache: bool) -> None:
    """``module.forward`` checkpointed, as an instance attribute: the class, the parameter names
    and the module's own hooks (outside the checkpoint) stay as they were. Bound methods, so a
    deepcopy of the module calls its own copy."""
    module._parallelkit_plain_forward = module.forward
    module._parallelkit_drop_cache = drop_cache
    module.forward = types.MethodType(_recomputed_forward, module)


def _recomputed_forward(self: nn.Module, *args, **kwargs):
    if not torch.is_grad_enabled():  # inference, generation: nothing to recompute
        return self._parallelkit_plain_forward(*args, **kwargs)
    if self._parallelkit_drop_cache:
        kwargs = _without_cache(self, kwargs)
    return checkpoint(self._parallelkit_plain_forward, *args, **kwargs)


def _without_cache(layer: nn.Module, kwargs: dict) -> dict:
    """A KV cache would be appended to again by the recompute (transformers drops it under its
    own gradient checkpointing too): training needs none, so it is dropped, with a warning."""
    dropped = [k for k in CACHE_ARGUMENTS if kwargs.get(k) is not None]
    if not dropped and not kwargs.get("use_cache"):
        return kwargs
    if dropped:
        warnings.warn(f"{type(layer).__name__} is recomputed in backward, so it is not given "
                      f"its KV cache ({', '.join(dropped)}=None): pass use_cache=False when "
                      "training", stacklevel=3)
    return {**kwargs, **{k: None for k in dropped}, **({"use_cache": False}
                                                       if "use_cache" in kwargs else {})}


def _attention_cores(layer: nn.Module, index: int) -> list[nn.Module]:
    """The modules of ``layer`` whose forward is the attention core, or those whose forward calls
    transformers' attention interface (the core is that call); ValueError if neither."""
    named = [m for name, m in layer.named_modules() if name.rsplit(".", 1)[-1] == "core_attention"]
    if named:
        return named
    found = [m for m in layer.modules() if _calls_attention_interface(m)]
    if not found:
        raise ValueError(f"recompute='selective' needs each decoder layer's attention core, and "
                         f"layer {index} ({type(layer).__name__}) has none: no submodule named "
                         "'core_attention' (Megatron's and TinyLM's name) and no module whose "
                         "forward calls transformers' attention interface "
                         "(ALL_ATTENTION_FUNCTIONS); use recompute='full', or name the module "
                         "that computes softmax(q k^T) v 'core_attention'")
    return found


def _calls_attention_interface(module: nn.Module) -> bool:
    import inspect

    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return (code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
            and hasattr(getattr(module, "config", None), "_attn_implementation"))


def _use_recomputed_interface(attention: nn.Module) -> None:
    """Point ``attention``'s config at an implementation that checkpoints the one it used when
    the calling module is marked; the config may be shared with layers left unmarked."""
    config = attention.config
    base = config._attn_implementation or "eager"
    if not base.startswith(IMPLEMENTATION):
        eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
        if base == "eager" and eager is None:
            raise ValueError(f"{type(attention).__name__} uses eager attention but its module "
                             "defines no eager_attention_forward to recompute; use "
                             "recompute='full'")
        config._attn_implementation = _register(base)
    attention._parallelkit_recompute_core = True


def _register(base: str) -> str:
    """``parallelkit_recompute_<base>`` in transformers' attention registry (and its mask
    registry, with ``base``'s mask function, so masks are built as before)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"{IMPLEMENTATION}_{base}"

    def recomputed_attention(module, *args, **kwargs):
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        function = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)
        if getattr(module, "_parallelkit_recompute_core", False):
            return checkpoint(function, module, *args, **kwargs)
        return function(module, *args, **kwargs)

    AttentionInterface.register(name, recomputed_attention)
    if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:  # else transformers builds no mask
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
