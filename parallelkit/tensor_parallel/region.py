"""A sequence-parallel region: a module whose input is gathered along the sequence once on entry.

A transformer's attention and MLP each begin with column-parallel layers (q/k/v, gate/up) and end
with a row-parallel one (o, down). Under sequence parallelism the residual stream between them
holds ``[b, s/tp, h]``, this rank's part of the tokens. Megatron's layers gather inside each
column layer, which works when the module around them takes its sizes from its config; a
transformers attention takes its sizes from its own input (``hidden_states.shape[:-1]``), so the
whole module must see the whole sequence. ``install_region`` hooks the module so that:

- on entry its ``hidden_states`` (first positional argument or keyword) is all-gathered along the
  sequence, and the module runs on ``[b, s, h]``;
- its column layers (``ColumnParallelLinear`` with ``sequence_parallel``) take that gathered input
  as it is: no gather of their own and no all-reduce in backward, since the gather's backward
  reduce-scatters their summed input gradient;
- its row layers reduce-scatter their output back to ``[b, s/tp, h]`` as usual.

With ``overlap_comm`` the gather is fused into the column layers' matmul: one ring
``all_gather_matmul`` against their weights concatenated (q, k and v together), which also yields
the gathered input that the module is given; each column layer then returns its slice of the
product. A column layer of a region called with anything but the region's gathered input raises.
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
        x = args[0] if args else kwargs["hidden_states"]
        first = layers[0]
        first._check_input(x, first.in_features, "the full input features", split_sequence=True)
        dim = mappings.sequence_dim_of(type(mod).__name__, x.shape, sequence_dim)
        if overlap_comm:
            weight = torch.cat([layer.weight for layer in layers]) if len(layers) > 1 \
                else first.weight
            front = x.movedim(dim, 0).contiguous()  # the ring splits the leading dim
            y, full = overlap.all_gather_matmul_and_input(front, weight, bound.group,
                                                          chunks_per_rank)
            y, full = y.movedim(0, dim), full.movedim(0, dim)
            outputs = y.split([layer.weight.shape[0] for layer in layers], dim=-1)
        else:
            full = mappings.gather_from_sp_region(x, bound.group, dim=dim)
            outputs = [None] * len(layers)
        for layer, out in zip(layers, outputs):
            layer.region_call = RegionCall(full, out)
        if args:
            return (full, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": full}

    def leave(mod, args, kwargs, output=None):
        for layer in columns():
            layer.region_call = None

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True, always_call=True)
    module.sequence_parallel_region = True


class RegionCall:
    """What a column layer of a region gets for one call of the region: the gathered input it
    must be called with, and its product already computed by the fused ring (or None)."""

    def __init__(self, gathered: torch.Tensor, product: torch.Tensor | None):
        self.gathered, self.product = gathered, product
