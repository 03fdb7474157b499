"""Packed batches for models under context parallelism: pack, pad, split per document.

    ids, cu_seqlens, lengths = pack_documents(docs, multiple=2 * cp)     # one padded row
    batch = split_packed_batch(ids, cu_seqlens, lengths=lengths)          # this CP rank's part
    loss = model(**batch).loss                                            # a parallelize()d model

``split_packed_batch`` gives what a transformers model takes for a packed row: this rank's
``input_ids``, ``position_ids`` restarting at each document, ``shift_labels`` (each token's next
token within its document; -100 at a document's last token and on padding, so the loss ignores
them), ``cu_seq_lens_q`` / ``cu_seq_lens_k``, the boundaries of the whole packed sequence, which
ring attention reads to keep attention inside each document (``distributed/packed_layout.py``
says which tokens each rank holds), and ``use_cache=False``: transformers recognises packing
from the restarting position ids only without a KV cache, and otherwise lets documents attend
to each other. With cp = 1 it is the whole batch, for the model's own attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallelkit.distributed.groups import bind_group
from parallelkit.distributed.packed_layout import PackedLayout, pad_documents, split_packed

IGNORE_INDEX = -100


def pack_documents(documents: list[torch.Tensor], multiple: int = 1,
                   pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents (1-D token tensors) back to back in one row, each padded at its end with
    ``pad_id`` to a multiple of ``multiple`` (``2 * cp`` for the zigzag split).

    Returns ids [1, S], cu_seqlens [n + 1] of the padded documents and lengths [n] (real tokens).
    """
    if not documents or any(d.dim() != 1 or d.numel() == 0 for d in documents):
        raise ValueError("pack_documents takes a non-empty list of non-empty 1-D token tensors")
    lengths = [d.numel() for d in documents]
    padded, _ = pad_documents([0] + torch.tensor(lengths).cumsum(0).tolist(), multiple)
    ids = torch.full((1, padded[-1]), pad_id, dtype=documents[0].dtype)
    for start, doc in zip(padded, documents):
        ids[0, start:start + doc.numel()] = doc
    return ids, torch.tensor(padded), torch.tensor(lengths)


def document_shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor,
                          lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[b, S] labels shifted within each document: out[t] = labels[t + 1] when t + 1 is a real
    token of t's document, else -100 (a document's last token, padding)."""
    bounds = cu_seqlens.tolist()
    real_ends = bounds[1:] if lengths is None else [a + n for a, n in zip(bounds,
                                                                            lengths.tolist())]
    shifted = torch.full_like(labels, IGNORE_INDEX)
    for start, end in zip(bounds, real_ends):
        shifted[:, start:end - 1] = labels[:, start + 1:end]
    return shifted


def split_packed_batch(input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                       cp_group: dist.ProcessGroup | None = None, layout: str = "zigzag",
                       labels: torch.Tensor | None = None,
                       lengths: torch.Tensor | None = None) -> dict:
    """This CP rank's part of a packed batch, as keyword arguments of a transformers forward.

    Args:
        input_ids: [b, S] packed rows, every row with the same document boundaries (b = 1 for
            a batch packed into one row, the usual case).
        cu_seqlens: [n + 1] boundaries of the documents, each a multiple of 2·cp tokens
            (zigzag) or cp (contiguous); see :func:`pack_documents`.
        cp_group: default the MPU's.
        labels: [b, S] the targets in transformers' convention (default input_ids); shifted
            within each document here.
        lengths: [n] real tokens per document; the rest of each is padding, ignored by the loss.

    Returns:
        {"input_ids", "position_ids", "shift_labels", "labels" (= shift_labels, so transformers
        computes a loss), "cu_seq_lens_q", "cu_seq_lens_k", "use_cache"}, tokens [b, S/cp].
    """
    group = bind_group(cp_group, "cp")
    packed = PackedLayout.build(cu_seqlens, group.size, layout,
                                None if lengths is None else lengths)
    if input_ids.dim() != 2 or input_ids.shape[1] != packed.total:
        raise ValueError(f"input_ids must be [b, {packed.total}] (cu_seqlens end at "
                         f"{packed.total}), got {list(input_ids.shape)}")
    shift = document_shift_labels(input_ids if labels is None else labels, cu_seqlens, lengths)
    rank = dist.get_rank(group.group)
    local_shift = split_packed(shift, packed, rank)
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=input_ids.device)
    return {
        "input_ids": split_packed(input_ids, packed, rank),
        "position_ids": packed.positions(rank, input_ids.device).expand(input_ids.shape[0], -1),
        "shift_labels": local_shift, "labels": local_shift,
        "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "use_cache": False,
    }

