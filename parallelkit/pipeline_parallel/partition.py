"""Split a model's layers into pipeline stages, with virtual (interleaved) stages.

    chunks = stage_chunks(model.blocks, pp_rank, pp, virtual_pp=2,
                          pre=model.embed, post=nn.Sequential(model.ln_f, model.lm_head))

``pp * virtual_pp`` global stages, each a contiguous run of layers; global stage ``s`` lives on
pipeline rank ``s % pp`` as its chunk ``s // pp`` (stage k holds chunks k, k+pp, ...). The first
global stage also runs ``pre`` (the embedding), the last runs ``post`` (final norm and head);
the loss is applied by the executor on the last stage.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def balanced_partition(costs: Sequence[float], parts: int) -> list[range]:
    """Split ``len(costs)`` consecutive layers into ``parts`` non-empty ranges with the smallest
    possible largest total cost (exact dynamic programme, O(parts · n²))."""
    n = len(costs)
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts={parts!r} must be an integer >= 1")
    if n < parts:
        raise ValueError(f"cannot split {n} layers into {parts} pipeline stages: every stage needs "
                         f"at least one layer; use fewer stages (pp x virtual_pp) or more layers")
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must be >= 0, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: the smallest largest part when the first i layers form k parts; cut[k][i]: where
    # the k-th part starts in that split
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        bounds.append(range(cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


def even_partition(n: int, parts: int) -> list[range]:
    """``n`` layers in ``parts`` runs whose sizes differ by at most one (earlier runs larger)."""
    balanced_partition([1.0] * n, parts)  # the same checks and errors
    size, extra = divmod(n, parts)
    starts = [k * size + min(k, extra) for k in range(parts + 1)]
    return [range(starts[k], starts[k + 1]) for k in range(parts)]


def partition_layers(layers: Sequence[nn.Module], pp: int, virtual_pp: int = 1,
                     costs: Sequence[float] | None = None) -> list[list[nn.Module]]:
    """The layers of each global stage (index ``chunk * pp + rank``), balanced by layer count or
    by ``costs`` (one per layer). Interleaving (virtual_pp > 1) needs the layer count divisible by
    pp * virtual_pp, as in Megatron, so that every chunk is the same depth."""
    layers = list(layers)
    stages = pp * virtual_pp
    if virtual_pp > 1 and len(layers) % stages:
        raise ValueError(f"interleaved pipeline with pp={pp} and virtual_pp={virtual_pp} needs the "
                         f"number of layers divisible by pp*virtual_pp={stages}, got {len(layers)}")
    if costs is not None and len(costs) != len(layers):
        raise ValueError(f"got {len(costs)} layer costs for {len(layers)} layers")
    ranges = (balanced_partition(costs, stages) if costs is not None
              else even_partition(len(layers), stages))
    return [layers[r.start:r.stop] for r in ranges]


class StageChunk(nn.Module):
    """One model chunk: ``pre`` (first global stage only), the layers, ``post`` (last only).

    Input ``[s, b, h]`` activations (the first chunk: whatever ``pre`` takes, e.g. ids
    ``[s, b]``); output ``[s, b, h]`` (the last chunk: whatever ``post`` returns, e.g. logits).
    """

    def __init__(self, layers: Sequence[nn.Module], pre: nn.Module | None = None,
                 post: nn.Module | None = None):
        super().__init__()
        self.pre, self.post = pre, post
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        for layer in self.layers:
            x = layer(x)
        return self.post(x) if self.post is not None else x


def stage_chunks(layers: Sequence[nn.Module], pp_rank: int, pp: int, virtual_pp: int = 1,
                 pre: nn.Module | None = None, post: nn.Module | None = None,
                 costs: Sequence[float] | None = None) -> list[StageChunk]:
    """This pipeline rank's ``virtual_pp`` chunks; ``layers`` may be a list, an ``nn.Sequential``
    or an ``nn.ModuleList`` (e.g. a model's transformer blocks). The modules are shared, not
    copied: build the whole model on every rank from one seed, keep this rank's chunks."""
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} is not a rank of a pipeline of size pp={pp}")
    per_stage = partition_layers(layers, pp, virtual_pp, costs)
    last = pp * virtual_pp - 1
    return [StageChunk(per_stage[s], pre if s == 0 else None, post if s == last else None)
            for s in (chunk * pp + pp_rank for chunk in range(virtual_pp))]
