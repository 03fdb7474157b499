"""The structural plan: a standard decoder recognised by its module names, or a clear refusal.

Every ``nn.Linear`` inside the decoder layers must be placed: attention q/k/v or a fused qkv
(column) and o (row), a gated (gate/up or a fused gate_up column, down row) or plain (fc1/up
column, fc2/down row) MLP. The modules that call them (attention, MLP) are parallel regions. The input embedding is vocab-parallel, the
output embedding the LM head. Norms are placed by where they act: a norm of the decoder layer
itself (or after the stack) sees the residual stream, so it is a sequence-parallel norm; a norm
inside the attention acts on a column layer's sharded output: per head (Qwen3's q/k norms over
the head dim) it stays as it is, over the whole projection (OLMo-2's) it becomes a parallel norm
whose statistics span the TP ranks. The first decoder layer is where the sequence split starts.
"""

from __future__ import annotations

import re

from torch import nn

from parallelkit.models import config_heads
from parallelkit.parallel_styles import (ColwiseParallel, LMHead, ParallelRegion, PerHeadNorm,
                                         RowwiseParallel, SequenceParallelEntry,
                                         SequenceParallelNorm, ShardedNorm, VocabParallel)

COLUMN = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "gate_proj", "up_proj",
          "fc1", "c_fc", "w1", "w3", "dense_h_to_4h"}
# "c_proj" and "dense" are the output projections of attention and MLP blocks (GPT-2 style,
# Starcoder2; Phi, GPT-NeoX): inside a decoder layer they always close a block.
ROW = {"o_proj", "out_proj", "down_proj", "fc2", "w2", "dense_4h_to_h", "c_proj", "dense"}


def _qkv_parts(model: nn.Module) -> list[int]:
    heads, kv_heads = config_heads(model)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


# Fused column projections laid out part after part ([q | k | v], [gate | up]): each part is
# split across ranks, so a rank keeps its heads of q, k and v and its halves of gate and up.
FUSED = {"qkv_proj": _qkv_parts, "gate_up_proj": lambda model: 2}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, modules) of the model's stack of decoder layers: its longest ModuleList."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers; pass "
                         "parallelize(model, plan={pattern: style}) for it")
    return max(lists, key=lambda item: len(item[1]))


def structural_plan(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict:
    """{pattern: style} for ``model`` by its structure; ValueError naming an unplaceable module.
    ``exclude``: modules of a decoder layer (e.g. "mlp") that the caller places itself."""
    stack, layers = decoder_layers(model)
    plan, regions = {}, set()  # regions: the modules that call column layers
    for name, module in layers[0].named_modules():
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        leaf = name.rsplit(".", 1)[-1]
        pattern = f"{stack}.*.{name}"
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            if leaf in COLUMN or leaf in FUSED:
                plan[pattern] = ColwiseParallel(parts=FUSED[leaf](model) if leaf in FUSED
                                                else None)
                regions.add(name.rpartition(".")[0])
            elif leaf in ROW:
                plan[pattern] = RowwiseParallel()
            else:
                raise ValueError(f"cannot place {stack}.0.{name} ({type(module).__name__}) of "
                                 f"{type(model).__name__}: not a known column ({sorted(COLUMN)}) "
                                 f"or row ({sorted(ROW)}) projection; pass a plan for it")
        elif _is_norm(module):
            plan[pattern] = _norm_style(name, module, model)
    for region in sorted(regions - {""}):
        plan[f"{stack}.*.{region}"] = ParallelRegion()
    if "" not in regions:  # column layers called by the layer itself cannot see the whole sequence
        plan[f"{stack}.0"] = SequenceParallelEntry()
    names = {m: n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    plan[names[embed]] = VocabParallel()
    if head is not None:
        plan[names[head]] = LMHead()
    final = [n for n, m in model.named_modules() if _is_norm(m) and not n.startswith(stack + ".")
             and _normalizes_hidden(m, model)]
    for name in final:
        plan[name] = SequenceParallelNorm()
    return plan


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or re.search(
        r"(RMS|Layer)Norm$", type(module).__name__) is not None


def _norm_style(name: str, norm: nn.Module, model: nn.Module):
    """A norm of decoder layer 0 at ``name``: placed by where it acts (see the module docstring)."""
    if "." not in name:
        return SequenceParallelNorm()
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"cannot place the norm {name} ({type(norm).__name__}) of "
                         f"{type(model).__name__}: it has no weight to tell whether it acts per "
                         "head or over a whole sharded projection; pass a plan for it")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config_heads(model)[0]
    return PerHeadNorm() if weight.shape[-1] == head_dim else ShardedNorm()


def _normalizes_hidden(norm: nn.Module, model: nn.Module) -> bool:
    """A norm over the whole hidden size (not per head, like Qwen3's q/k norms)."""
    weight = getattr(norm, "weight", None)
    hidden = getattr(model.config, "hidden_size", None) if hasattr(model, "config") else None
    return weight is None or hidden is None or weight.shape[-1] == hidden
