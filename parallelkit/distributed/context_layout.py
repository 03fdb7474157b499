"""Which tokens of a sequence each context-parallel rank holds.

``contiguous``: rank r holds the r-th of cp equal slices. Simple, but under a causal mask the last
rank's queries see every key and the first rank's almost none: rank r does ~ (2r + 1) units of
work, so a ring step waits for the slowest rank.

``zigzag``: the sequence is cut into 2·cp chunks and rank r holds chunks r and 2·cp − 1 − r, one
early and one late, so every rank does the same causal work (each ring step costs two quarter
blocks; ring-flash-attention and Megatron use the same split).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallelkit.distributed import comm

LAYOUTS = ("zigzag", "contiguous")


def chunk_ids(layout: str, cp_rank: int, cp_size: int) -> list[int]:
    """The sequence chunks rank ``cp_rank`` holds, in order; chunks are seq / parts(layout) long."""
    if layout == "zigzag":
        return [cp_rank, 2 * cp_size - 1 - cp_rank]
    if layout == "contiguous":
        return [cp_rank]
    raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")


def parts(layout: str, cp_size: int) -> int:
    """How many equal chunks the full sequence is cut into."""
    return 2 * cp_size if layout == "zigzag" else cp_size


def check_sequence_length(seq_len: int, layout: str, cp_size: int) -> None:
    n = parts(layout, cp_size)
    if seq_len % n:
        raise ValueError(f"a sequence of {seq_len} tokens cannot be split for context parallelism "
                         f"with cp={cp_size} and layout={layout!r}: it must be a multiple of {n}; "
                         f"pad the sequence to a multiple of {n}")


def split_for_context_parallel(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1,
                               layout: str = "zigzag") -> torch.Tensor:
    """This rank's tokens of ``x`` along the sequence ``dim`` (e.g. [b, s] ids, [b, h, s, d])."""
    check_sequence_length(x.shape[dim], layout, cp_size)
    chunks = x.chunk(parts(layout, cp_size), dim)
    return torch.cat([chunks[i] for i in chunk_ids(layout, cp_rank, cp_size)], dim).contiguous()


def gather_from_context_parallel(x: torch.Tensor, cp_group: dist.ProcessGroup, dim: int = 1,
                                 layout: str = "zigzag") -> torch.Tensor:
    """Inverse of :func:`split_for_context_parallel`: the full sequence, on every CP rank."""
    cp_size = dist.get_world_size(cp_group)
    per_rank = comm.all_gather(x, dim, cp_group).chunk(cp_size, dim)
    held = len(chunk_ids(layout, 0, cp_size))
    ordered = [None] * parts(layout, cp_size)
    for rank, local in enumerate(per_rank):
        for chunk, piece in zip(chunk_ids(layout, rank, cp_size), local.chunk(held, dim)):
            ordered[chunk] = piece
    return torch.cat(ordered, dim)


def context_parallel_positions(seq_len: int, cp_rank: int, cp_size: int, layout: str = "zigzag",
                               device=None) -> torch.Tensor:
    """Global position ids of this rank's tokens (for rotary embeddings and masks): [s/cp]."""
    return split_for_context_parallel(torch.arange(seq_len, device=device), cp_rank, cp_size,
                                      dim=0, layout=layout)
