"""``ContextParallelAttention``: a drop-in for ``F.scaled_dot_product_attention`` under CP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallelkit.distributed.context_layout import LAYOUTS
from parallelkit.context_parallel.ulysses import ulysses_attention
from parallelkit.distributed.groups import bind_group
from parallelkit.ops.ring_attention import ring_attention

MODES = {"ring": ring_attention, "ulysses": ulysses_attention}


class ContextParallelAttention(nn.Module):
    """Exact attention over a sequence whose tokens are split across the CP group.

    ``forward(q, k, v, is_causal=False, scale=None)`` takes what ``scaled_dot_product_attention``
    takes, for this rank's tokens: q ``[b, heads, s/cp, d]``, k and v ``[b, kv_heads, s/cp, d]``
    (GQA when kv_heads < heads), tokens in ``layout`` order (``split_for_context_parallel``), and
    returns ``[b, heads, s/cp, d]``. For packed documents it also takes ``cu_seqlens``, the
    boundaries of the whole packed sequence, whose documents are split one by one
    (``split_packed``); ``position_ids``, if given, are checked against the split.

    Args:
        cp_group: the context-parallel group (default: the MPU's).
        layout: "zigzag" (balanced causal work) or "contiguous".
        mode: "ring" (K/V travel around the group; any head count) or "ulysses" (all-to-all to a
            head split; needs heads divisible by cp).
    """

    def __init__(self, cp_group: dist.ProcessGroup | None = None, layout: str = "zigzag",
                 mode: str = "ring"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {tuple(MODES)}")
        self._group = bind_group(cp_group, "cp")
        self.cp_group = self._group.group
        self.layout, self.mode = layout, mode

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self._group.check(self)
        return MODES[self.mode](q, k, v, self.cp_group, causal=is_causal, layout=self.layout,
                                scale=scale, cu_seqlens=cu_seqlens, position_ids=position_ids)

    def extra_repr(self) -> str:
        return (f"cp={dist.get_world_size(self.cp_group)}, layout={self.layout!r}, "
                f"mode={self.mode!r}")
