"""An embedding table whose vocabulary is split across TP ranks.

Rank r holds rows ``[r * V/tp, (r+1) * V/tp)``. Each rank looks up the ids that fall in its range,
writes zeros for the others, and the sum over TP ranks is the full lookup: an all-reduce, or under
sequence parallelism a reduce-scatter that leaves each rank its ``s/tp`` part of the sequence
(dim ``sequence_dim``: 0 for sequence-first ids ``[s, b]``, 1 for batch-first ``[b, s]``).

A vocabulary that does not divide by tp is an error (pad the vocabulary, e.g. 50257 → 50260 for
tp=4, and keep the extra rows out of the loss); the embedding never pads silently.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallelkit.distributed import comm, mappings
from parallelkit.distributed.groups import bind_group
from parallelkit.tensor_parallel.sharding import (check_positive_int, copy_shard_, divide,
                                                  new_parameter)


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with its rows split across TP ranks.

    Shapes:
        ids: ``[s, b]`` (any shape without sequence parallelism), int64, values in [0, vocab).
        out: ``[s, b, dim]`` replicated, or ``[s/tp, b, dim]`` with ``sequence_parallel``
             (``[b, s/tp, dim]`` from ids ``[b, s]`` with ``sequence_dim=1``).
    ``sequence_dim`` (used only with ``sequence_parallel``) counts the output's dims, as for the
    linear layers: a negative one counts from the end of ``[b, s, dim]``, so -2 is the sequence
    either way.
    Weight ``[vocab/tp, dim]``: this rank's rows. ``padding_idx`` keeps a zero gradient as in
    ``nn.Embedding``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 sequence_parallel: bool = False, *, sequence_dim: int = 0,
                 tp_group: dist.ProcessGroup | None = None, device=None, dtype=None,
                 skip_init: bool = False):
        super().__init__()
        mappings.check_sequence_dim("VocabParallelEmbedding", sequence_dim)
        check_positive_int("VocabParallelEmbedding", "num_embeddings", num_embeddings)
        check_positive_int("VocabParallelEmbedding", "embedding_dim", embedding_dim)
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"VocabParallelEmbedding padding_idx={padding_idx} must be in "
                             f"[-{num_embeddings}, {num_embeddings}) (num_embeddings)")
        self._group = bind_group(tp_group, "tp")
        self.tp_group, self.tp = self._group.group, self._group.size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        local = divide(num_embeddings, self.tp, "VocabParallelEmbedding num_embeddings (vocab)")
        self.vocab_start = dist.get_rank(self.tp_group) * local
        self.vocab_end = self.vocab_start + local
        self.weight = new_parameter((local, embedding_dim), dtype, device, 0)
        if not skip_init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the full table as ``nn.Embedding`` does (CPU RNG), keep this rank's rows."""
        master = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                              dtype=self.weight.dtype)
        copy_shard_(self.weight, master.weight.detach(), 0, self.tp_group)

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, sequence_parallel: bool = False, *,
                   sequence_dim: int = 0,
                   tp_group: dist.ProcessGroup | None = None) -> "VocabParallelEmbedding":
        """This rank's rows of ``embedding``; the layer computes what ``embedding`` did."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding.from_dense expects an nn.Embedding, got "
                            f"{type(embedding).__name__}")
        unsupported = [name for name, on in [("max_norm", embedding.max_norm is not None),
                                             ("scale_grad_by_freq", embedding.scale_grad_by_freq),
                                             ("sparse", embedding.sparse)] if on]
        if unsupported:
            raise ValueError(f"VocabParallelEmbedding does not support nn.Embedding's "
                             f"{unsupported}; convert an embedding without them")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                    sequence_parallel, sequence_dim=sequence_dim, tp_group=tp_group,
                    device=embedding.weight.device, dtype=embedding.weight.dtype, skip_init=True)
        copy_shard_(layer.weight, embedding.weight.detach(), 0, layer.tp_group)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Checked inside the TP ranks' agreement: ids bad on one rank raise on all of them.
        self._group.check_input(self, lambda: self._check_ids(ids))
        if self.tp == 1:
            out = F.embedding(ids, self.weight, self.padding_idx)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight, self._local_padding_idx())
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # another rank owns these rows
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sp_region(out, self.tp_group,
                                                        dim=self._output_sequence_dim(ids))
        return mappings.reduce_from_tp_region(out, self.tp_group)

    def _check_ids(self, ids: torch.Tensor) -> None:
        _check_ids(ids, self.num_embeddings, self.weight.device)
        if self.sequence_parallel:
            out_shape = (*ids.shape, self.embedding_dim)
            mappings.check_sequence_divisible("VocabParallelEmbedding", out_shape,
                                              self._output_sequence_dim(ids), self.tp)

    def _output_sequence_dim(self, ids: torch.Tensor) -> int:
        return mappings.sequence_dim_of("VocabParallelEmbedding", (*ids.shape, self.embedding_dim),
                                        self.sequence_dim, "output (ids.shape + (embedding_dim,))")

    def _local_padding_idx(self) -> int | None:
        if self.padding_idx is not None and self.vocab_start <= self.padding_idx < self.vocab_end:
            return self.padding_idx - self.vocab_start
        return None

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, "
                f"{self.vocab_end}), tp={self.tp}, sequence_parallel={self.sequence_parallel}, "
                f"sequence_dim={self.sequence_dim}")


def _check_ids(ids: torch.Tensor, vocab: int, device: torch.device) -> None:
    """Out-of-range ids would be silently zeroed by the masking: refuse them as nn.Embedding does."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"VocabParallelEmbedding expects a tensor of token ids, got "
                        f"{type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"VocabParallelEmbedding expects int64 or int32 ids, got {ids.dtype}; "
                        f"pass ids.long()")
    if ids.device != device:
        raise ValueError(f"VocabParallelEmbedding has its table on {device} but got ids on "
                         f"{ids.device}; move them with ids.to({str(device)!r})")
    if ids.numel() == 0:
        return
    in_range = (ids.min() >= 0) & (ids.max() < vocab)
    # No host sync on the GPU, nor a data-dependent branch in a compiled graph: the check
    # fails the stream (or the compiled step) instead.
    if ids.is_cuda or comm.compiling():
        torch._assert_async(in_range, f"token ids must be in [0, {vocab})")
    elif not in_range:
        raise IndexError(f"token ids must be in [0, {vocab}), got min {ids.min().item()} and "
                         f"max {ids.max().item()}")
