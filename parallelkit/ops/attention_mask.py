"""Which keys each query may see: one contiguous range of key indices per query row.

The attention block kernels honour one rule: query i of batch row b sees key j iff
``key_start[b, i] <= j < key_end[b, i]``; seen from the keys, key j is seen by the queries
``query_start[b, j] <= i < query_end[b, j]`` (what the dk/dv kernel loops over). Tiles outside
every row's range are never loaded.

The masks attention needs are ranges when both sides hold tokens of one packed sequence in
increasing position order, each document a contiguous stretch of it:

* causal attention of a block at global offsets (ring attention's blocks): the keys up to the
  query's position;
* packed documents (``cu_seqlens``): the keys of the query's own document, causally or not.

:func:`document_ranges` builds them from per-token positions and document ids; a token's
document must be a nondecreasing function of its position (the same on both sides), which it is
for any split of a packed sequence that keeps each rank's tokens in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KeyRanges:
    """Per-row visible ranges, int32; the batch dim is 1 when every row shares the mask.

    key_start, key_end: [B or 1, Sq]: query i sees keys key_start[i] <= j < key_end[i]
        (key_end <= key_start: none, the row's out is 0 and its lse -inf).
    query_start, query_end: [B or 1, Sk]: key j is seen by queries query_start[j] <= i <
        query_end[j].
    """

    key_start: torch.Tensor
    key_end: torch.Tensor
    query_start: torch.Tensor
    query_end: torch.Tensor

    def visible(self, rows: slice = slice(None), keys: slice | None = None) -> torch.Tensor:
        """The [B or 1, Sq, Sk] bool mask these ranges describe, or its window of query
        ``rows`` and ``keys`` (the torch path's)."""
        keys = keys or slice(0, self.query_start.shape[-1])
        index = torch.arange(keys.start, keys.stop, device=self.key_start.device)
        return ((index >= self.key_start[:, rows, None].long())
                & (index < self.key_end[:, rows, None].long()))

    def row_windows(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, last): for each window of ``rows`` consecutive queries, the union over its
        rows (and the batch) of their non-empty ranges, [first, last); first >= last where no
        row sees a key. What a kernel program (or a torch-path window) of ``rows`` queries
        loops over."""
        nonempty = self.key_end > self.key_start
        none = torch.iinfo(torch.int32).max
        first = torch.where(nonempty, self.key_start, none).amin(0)
        last = torch.where(nonempty, self.key_end, 0).amax(0)
        pad = -first.numel() % rows
        first = F.pad(first, (0, pad), value=none).view(-1, rows).amin(1)
        last = F.pad(last, (0, pad), value=0).view(-1, rows).amax(1)
        return first, last

    def any_visible(self) -> bool:
        return bool((self.key_end > self.key_start).any())


def offset_ranges(seq_q: int, seq_k: int, causal: bool, q_offset: int = 0, k_offset: int = 0,
                  device=None) -> KeyRanges:
    """The ranges of a block whose queries and keys are contiguous at global offsets: with
    ``causal``, key j is visible to query i iff k_offset + j <= q_offset + i."""
    q_pos = q_offset + torch.arange(seq_q, device=device)
    k_pos = k_offset + torch.arange(seq_k, device=device)
    return document_ranges(q_pos, k_pos, causal, check=False)


def document_ranges(q_positions: torch.Tensor, k_positions: torch.Tensor, causal: bool,
                    q_documents: torch.Tensor | None = None,
                    k_documents: torch.Tensor | None = None, check: bool = True) -> KeyRanges:
    """Ranges for attention within documents of one packed sequence.

    Key j is visible to query i iff they are in the same document and, with ``causal``,
    k_positions[j] <= q_positions[i].

    Args:
        q_positions: [Sq] or [B, Sq] integer positions of the queries in the packed sequence,
            strictly increasing along each row; k_positions: [Sk] or [B, Sk] likewise.
        q_documents, k_documents: document id of each token (shapes as the positions), or None
            for one document. Nondecreasing, and a function of the position: equal positions on
            the two sides carry the same id.
        check: verify those orders (one device sync); callers that built the positions
            themselves pass False.
    """
    if (q_documents is None) != (k_documents is None):
        raise ValueError("pass document ids for both the queries and the keys, or for neither")
    q_pos, k_pos = _rows(q_positions, "q_positions"), _rows(k_positions, "k_positions")
    if q_documents is None:
        q_doc, k_doc = torch.zeros_like(q_pos), torch.zeros_like(k_pos)
    else:
        q_doc = _rows(q_documents, "q_documents", like=q_pos)
        k_doc = _rows(k_documents, "k_documents", like=k_pos)
    batch = max(q_pos.shape[0], k_pos.shape[0])
    q_pos, q_doc = (t.expand(batch, -1).contiguous() for t in (q_pos, q_doc))
    k_pos, k_doc = (t.expand(batch, -1).contiguous() for t in (k_pos, k_doc))
    if check:
        _check_order(q_pos, q_doc, k_pos, k_doc)
    # A query's document is a contiguous run of the keys; causal cuts it at the query's position.
    key_start = torch.searchsorted(k_doc, q_doc)
    key_end = torch.searchsorted(k_doc, q_doc, right=True)
    query_start = torch.searchsorted(q_doc, k_doc)
    query_end = torch.searchsorted(q_doc, k_doc, right=True)
    if causal:
        key_end = torch.minimum(key_end, torch.searchsorted(k_pos, q_pos, right=True))
        query_start = torch.maximum(query_start, torch.searchsorted(q_pos, k_pos))
    return KeyRanges(*(t.to(torch.int32).contiguous()
                       for t in (key_start, key_end, query_start, query_end)))


def _rows(t: torch.Tensor, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex() or t.dim() not in (1, 2):
        raise ValueError(f"{name} must be a 1-D [S] or 2-D [B, S] integer tensor, got "
                         f"{t.dtype} of shape {list(t.shape)}")
    rows = t.reshape(1, -1) if t.dim() == 1 else t
    if like is not None and rows.shape != like.shape:
        raise ValueError(f"{name} must have the shape of its positions {list(like.shape)}, got "
                         f"{list(rows.shape)}")
    return rows.long()


def _check_order(q_pos, q_doc, k_pos, k_doc) -> None:
    for side, pos, doc in (("query", q_pos, q_doc), ("key", k_pos, k_doc)):
        if bool((pos.diff(dim=-1) <= 0).any()):
            raise ValueError(f"{side} positions must increase strictly along each row (tokens in "
                             "packed-sequence order)")
        if bool((doc.diff(dim=-1) < 0).any()):
            raise ValueError(f"{side} document ids must not decrease along a row (each document "
                             "a contiguous stretch of the packed sequence)")
    # Both sides together, in position order: one document per position, never decreasing.
    pos, order = torch.cat([q_pos, k_pos], dim=-1).sort(dim=-1, stable=True)
    doc = torch.cat([q_doc, k_doc], dim=-1).gather(-1, order)
    same_pos = pos.diff(dim=-1) == 0
    if bool((doc.diff(dim=-1) < 0).any()) or bool((same_pos & (doc.diff(dim=-1) != 0)).any()):
        raise ValueError("query and key document ids disagree: a token's document must be the "
                         "same function of its position on both sides (one packed sequence)")
