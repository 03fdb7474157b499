"""A sequence-parallel region: a module whose input is gathered along the sequence once on entry.

A transformer's attention and MLP each begin with column-parallel layers (q/k/v, gate/up) and end
with a row-parallel one (o, down). Under sequence parallelism the residual stream between them
holds ``[b, s/tp, h]``, this rank's part of the tokens. Megatron's layers gather inside each
column layer, which works when the module around them takes its sizes from its config; a
transformers attention takes its sizes from its own input (``hidden_states.shape[:-1]``), so the
whole module must see the whole sequence. ``install_region`` hooks the module so that:

- on entry its ``hidden_states`` (first positional argument or keyword) is all-gathered along the
  sequence, and the module runs on ``[b, s, h]``;
- its column layers (``ColumnParallelLinear`` with ``sequence_parallel``) are computed at entry
  too, in one matmul against their weights concatenated (q, k and v together), and each returns
  its slice of the product when the module calls it; the gather's backward reduce-scatters
  their summed input gradient;
- its row layers reduce-scatter their output back to ``[b, s/tp, h]`` as usual.

With ``overlap_comm`` the gather is fused into that matmul (one ring ``all_gather_matmul``,
which also yields the gathered input the module is given). Either way only this rank's tokens are
saved for backward (``ops/overlap.py``). A column layer of a region called with anything but the
region's gathered input raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.distributed import mappings
from parallelkit.distributed.groups import bind_group
from parallelkit.ops import overlap


def install_region(module: nn.Module, *, tp_group: dist.ProcessGroup | None, sequence_dim: int,
                   overlap_comm: bool, chunks_per_rank: int = 1) -> None:
    """Hook ``module`` (see the module docstring). ``sequence_dim``: where its input keeps the
    sequence (1 for batch-first ``[b, s, h]``)."""
    from parallelkit.tensor_parallel.linear import ColumnParallelLinear

    bound = bind_group(tp_group, "tp")
    path = ("fused all_gather_matmul" if overlap_comm else "all-gather then matmul") + \
        " shared by the region"

    in_call: list[ColumnParallelLinear] = []  # the column layers given this call's products

    def columns() -> list[ColumnParallelLinear]:
        found = [m for m in module.modules()
                 if isinstance(m, ColumnParallelLinear) and m.sequence_parallel]
        if not found:
            raise ValueError(f"{type(module).__name__} is a sequence-parallel region but holds no "
                             "ColumnParallelLinear with sequence_parallel=True: put the region "
                             "style on the module that calls the column layers (attention, MLP)")
        return found

    def enter(mod, args, kwargs):
        bound.check(mod)
        layers = columns()
        if not args and "hidden_states" not in kwargs:
            raise ValueError(f"{type(mod).__name__} is a sequence-parallel region: its input must "
                             "be its first positional argument or hidden_states=")
        x = args[0] if args else kwargs["hidden_states"]
        first = layers[0]
        widths = {layer.in_features for layer in layers}
        if len(widths) > 1:
            raise ValueError(f"{type(mod).__name__} is a sequence-parallel region, but its column "
                             f"layers take inputs of different widths {sorted(widths)}: they "
                             "must all read the region's input")
        first._check_input(x, first.in_features, "the full input features")
        dim = mappings.sequence_dim_of(type(mod).__name__, x.shape, sequence_dim)
        front = x.movedim(dim, 0).contiguous()  # the gather (and the ring) split the leading dim
        y, full = overlap.all_gather_matmul_and_input(
            front, [layer.weight for layer in layers], bound.group, chunks_per_rank,
            fused=overlap_comm)
        y, full = y.movedim(0, dim), full.movedim(0, dim)
        outputs = y.split([layer.weight.shape[0] for layer in layers], dim=-1)
        for layer, out in zip(layers, outputs):
            layer.region_call = RegionCall(full, out, path)
        in_call[:] = layers
        if args:
            return (full, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": full}

    def leave(mod, args, kwargs, output=None):
        for layer in in_call:
            layer.region_call = None
        in_call.clear()

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True, always_call=True)


class RegionCall:
    """What a column layer of a region gets for one call of the region: the gathered input it
    must be called with, its product (already computed, without bias) and the path taken."""

    def __init__(self, gathered: torch.Tensor, product: torch.Tensor, path: str):
        self.gathered, self.product, self.path = gathered, product, path
