"""Which tokens of a packed sequence each context-parallel rank holds: a split per document.

A packed sequence holds documents back to back; ``cu_seqlens`` (flash-attention's and
TransformerEngine's name) are their boundaries: ``[0, end of doc 0, end of doc 1, ..., S]``.
Attention stays inside a document, so splitting the packed sequence as one long sequence would
leave a rank's causal work depending on where documents happen to fall. Instead every document
is split as a whole sequence is (``context_layout``): under ``zigzag`` each document is cut into
2·cp chunks and rank r takes chunks r and 2·cp − 1 − r of every document (TE's THD layout), so
each rank holds the same share of every document and does the same causal work whatever the
mix of lengths; under ``contiguous`` rank r takes chunk r of each.

A rank's tokens are in packed order (document by document, each document's chunks in order),
so each of its queries sees one contiguous range of any rank's keys (``ops.attention_mask``).

Padding rule: every document's length must be a multiple of ``parts(layout, cp)`` (2·cp for
zigzag, cp for contiguous). :func:`pad_documents` pads each document at its end; the padding
tokens are kept out of attention (under ``causal`` they follow every real token of their
document; otherwise ``lengths`` marks them) and out of the loss (label -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallelkit.distributed import comm
from parallelkit.distributed.context_layout import LAYOUTS, chunk_ids, parts


@dataclass(frozen=True)
class PackedLayout:
    """The per-document split of one packed sequence over ``cp`` ranks.

    cu_seqlens: the documents' boundaries in the (padded) packed sequence, S = cu_seqlens[-1].
    lengths: real tokens per document (the rest of each document is padding), or None.
    """

    cu_seqlens: tuple[int, ...]
    cp: int
    layout: str = "zigzag"
    lengths: tuple[int, ...] | None = None

    @classmethod
    def build(cls, cu_seqlens, cp: int, layout: str = "zigzag", lengths=None) -> "PackedLayout":
        """Checks ``cu_seqlens`` (a 1-D integer tensor or sequence) and the padding rule."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
        if cp == 1:  # one rank holds everything, in order, whatever the layout: no padding rule
            layout = "contiguous"
        bounds = _int_list(cu_seqlens, "cu_seqlens")
        if len(bounds) < 2 or bounds[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0 and hold at least one document, got "
                             f"{_show(bounds)}")
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if any(size <= 0 for size in sizes):
            doc = next(i for i, size in enumerate(sizes) if size <= 0)
            raise ValueError(f"cu_seqlens must increase strictly (every document non-empty), "
                             f"but document {doc} spans [{bounds[doc]}, {bounds[doc + 1]}): "
                             f"{_show(bounds)}")
        n = parts(layout, cp)
        for doc, size in enumerate(sizes):
            if size % n:
                raise ValueError(
                    f"document {doc} has {size} tokens, not a multiple of {n}: under context "
                    f"parallelism (cp={cp}, layout={layout!r}) every document is split into {n} "
                    "equal chunks; pad each document to a multiple of it (pad_documents)")
        real = None
        if lengths is not None:
            real = tuple(_int_list(lengths, "lengths"))
            if len(real) != len(sizes) or any(not 0 <= r <= s for r, s in zip(real, sizes)):
                raise ValueError(f"lengths must give 0 <= real tokens <= the padded length of "
                                 f"each of the {len(sizes)} documents, got {list(real)} for "
                                 f"padded lengths {sizes}")
        return cls(tuple(bounds), cp, layout, real)

    @property
    def total(self) -> int:
        return self.cu_seqlens[-1]

    def local_cu_seqlens(self) -> list[int]:
        """Boundaries of the documents' pieces in one rank's tokens (every rank alike)."""
        return [b // self.cp for b in self.cu_seqlens]

    def token_index(self, rank: int, device=None) -> torch.Tensor:
        """[S/cp] int64: the packed positions of rank ``rank``'s tokens, in its order."""
        n, chunks = parts(self.layout, self.cp), chunk_ids(self.layout, rank, self.cp)
        pieces = []
        for start, end in zip(self.cu_seqlens, self.cu_seqlens[1:]):
            size = (end - start) // n
            pieces += [torch.arange(start + c * size, start + (c + 1) * size) for c in chunks]
        return torch.cat(pieces).to(device)

    def documents(self, rank: int, device=None) -> torch.Tensor:
        """[S/cp] int64 document id of each of rank ``rank``'s tokens. With ``lengths``, the
        padding of document d is a document of its own (ids 2d real, 2d + 1 padding), so no
        real token sees it."""
        doc, position = self._placed(rank)
        if self.lengths is not None:
            doc = 2 * doc + (position >= torch.tensor(self.lengths)[doc]).long()
        return doc.to(device)

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """[S/cp] int64 position of each of rank ``rank``'s tokens within its document (what
        rotary embeddings take: transformers' ``position_ids`` of a packed batch)."""
        return self._placed(rank)[1].to(device)

    def _placed(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(document, position within it) of each of rank ``rank``'s tokens, on the CPU."""
        index = self.token_index(rank)
        bounds = torch.tensor(self.cu_seqlens)
        doc = torch.searchsorted(bounds, index, right=True) - 1
        return doc, index - bounds[doc]

    def step_visible(self, rank: int, kv_rank: int, causal: bool) -> bool:
        """Whether any query of ``rank`` sees a key of ``kv_rank`` (the same for every
        document: each holds the same chunks on each rank)."""
        return not causal or any(k <= q for q in chunk_ids(self.layout, rank, self.cp)
                                 for k in chunk_ids(self.layout, kv_rank, self.cp))


def split_packed(x: torch.Tensor, layout: PackedLayout, cp_rank: int,
                 dim: int = 1) -> torch.Tensor:
    """This rank's tokens of ``x`` (e.g. [b, S] ids, [b, S, h]) along the packed ``dim``."""
    if x.shape[dim] != layout.total:
        raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} but cu_seqlens ends at "
                         f"{layout.total}; pass the whole packed sequence")
    return x.index_select(dim, layout.token_index(cp_rank, x.device))


def gather_packed(x: torch.Tensor, layout: PackedLayout, cp_group: dist.ProcessGroup,
                  dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_packed`: the whole packed sequence, in order, on every rank."""
    gathered = comm.all_gather(x, dim, cp_group)
    order = torch.cat([layout.token_index(r) for r in range(layout.cp)])
    return gathered.index_select(dim, torch.argsort(order).to(x.device))


def pad_documents(cu_seqlens, multiple: int) -> tuple[list[int], list[int]]:
    """(padded cu_seqlens, real lengths): each document padded at its end to a multiple of
    ``multiple`` (``parts(layout, cp)``: 2·cp for zigzag)."""
    bounds = _int_list(cu_seqlens, "cu_seqlens")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    padded = [0]
    for size in lengths:
        padded.append(padded[-1] + -(-size // multiple) * multiple)
    return padded, lengths


def _int_list(values, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.dim() != 1:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {values.dtype} of shape "
                             f"{list(values.shape)}")
        return values.tolist()
    return [int(v) for v in values]


def _show(bounds: list[int]) -> str:
    return str(bounds) if len(bounds) <= 12 else f"{bounds[:6]} ... {bounds[-3:]}"
