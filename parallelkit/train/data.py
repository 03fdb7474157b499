"""Training tokens: where samples come from, and which rank reads which part of which sample.

A sample is ``seq + 1`` consecutive tokens: its first ``seq`` are the inputs and its last ``seq``
the labels (each input's next token), so every label is a real token and none is ignored.

Sources (``num_samples``, ``sample(i) -> [seq + 1]`` int64):

- :class:`SyntheticTokens`: sample ``i`` depends on ``(seed, i)`` alone: a walk through a fixed
  successor permutation of the vocabulary with 10% of the tokens replaced by noise, so a model
  has something to learn (the demo's data).
- :class:`MemmapTokens`: a flat file of token ids as nanoGPT's ``prepare.py`` writes it
  (``np.memmap(path, dtype=uint16 | uint32, mode="r")``). Sample ``i`` is
  ``tokens[i * seq : i * seq + seq + 1]``: windows that share only their boundary token.

Order (:class:`BatchLoader`): epoch ``e`` visits the samples in a permutation seeded by
``(seed, e)``; the epochs follow each other as one stream, and step ``t``'s global batch is
positions ``[t * G, (t + 1) * G)`` of it (``G`` = global batch), so the data position is a pure
function of the step and a resumed run reads what the uninterrupted one would. DP rank ``r``
takes the positions ``t * G + r + k * dp`` (a strided share: the DP ranks' samples are
disjoint); its micro-batch ``m`` is ``k`` in ``[m * micro, (m + 1) * micro)``. CP rank ``c``
gets its zigzag part of those samples' inputs and labels (``split_for_context_parallel``) and
the global positions of its tokens; TP ranks read the same as each other.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from parallelkit.distributed.context_layout import split_for_context_parallel

NOISE = 0.1  # share of synthetic tokens replaced by a random one


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts``, unrelated for different parts."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(),
                          "little") >> 1


class SyntheticTokens:
    """``num_samples`` samples of ``seq + 1`` tokens below ``vocab``, each from ``(seed, i)``."""

    def __init__(self, vocab: int, seq: int, num_samples: int, seed: int = 0):
        self.vocab, self.seq, self.num_samples, self.seed = vocab, seq, num_samples, seed
        g = torch.Generator().manual_seed(derived_seed("successor", seed))
        self.successor = torch.randperm(vocab, generator=g)

    def samples(self, indices: list[int]) -> torch.Tensor:
        """``[len(indices), seq + 1]`` int64."""
        n, length = len(indices), self.seq + 1
        start, noisy, noise = (torch.empty(n, dtype=torch.long),
                               torch.empty(n, length, dtype=torch.bool),
                               torch.empty(n, length, dtype=torch.long))
        for row, i in enumerate(indices):
            _check_index(i, self.num_samples)
            g = torch.Generator().manual_seed(derived_seed("sample", self.seed, i))
            start[row] = torch.randint(0, self.vocab, (), generator=g)
            noisy[row] = torch.rand(length, generator=g) < NOISE
            noise[row] = torch.randint(0, self.vocab, (length,), generator=g)
        tokens = torch.empty(n, length, dtype=torch.long)
        tokens[:, 0] = start
        for t in range(1, length):  # a walk: one vectorised step per position
            tokens[:, t] = torch.where(noisy[:, t], noise[:, t], self.successor[tokens[:, t - 1]])
        return tokens


class MemmapTokens:
    """The flat token file at ``path`` (``dtype`` "uint16" or "uint32"), read lazily."""

    def __init__(self, path: str, seq: int, vocab: int, dtype: str = "uint16"):
        itemsize = np.dtype(dtype).itemsize
        try:
            size = os.path.getsize(path)
        except OSError as error:
            raise ValueError(f"cannot read the token file {path!r}: {error}") from None
        if size % itemsize:
            raise ValueError(f"{path!r} is {size} bytes, not a whole number of {dtype} tokens: "
                             f"is data_dtype={dtype!r} the dtype it was written with?")
        count = size // itemsize
        if count < seq + 1:
            raise ValueError(f"{path!r} holds {count} tokens, fewer than one sample of seq + 1 = "
                             f"{seq + 1}: use a shorter seq or a longer file")
        self.path, self.seq, self.vocab = path, seq, vocab
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.num_samples = (count - 1) // seq

    def samples(self, indices: list[int]) -> torch.Tensor:
        rows = []
        for i in indices:
            _check_index(i, self.num_samples)
            rows.append(np.asarray(self.tokens[i * self.seq:(i + 1) * self.seq + 1]))
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        top = int(tokens.max())
        if top >= self.vocab:
            raise ValueError(f"{self.path!r} holds token id {top} (in samples {indices}), but "
                             f"the model's vocabulary has {self.vocab} ids: tokenize with the "
                             "model's tokenizer, or give the model a larger vocabulary")
        return tokens


def _check_index(i: int, n: int) -> None:
    if not 0 <= i < n:
        raise IndexError(f"sample {i} is outside [0, {n})")


@dataclass(frozen=True)
class MicroBatch:
    """This rank's part of one micro-batch: ids and labels ``[micro, seq/cp]``, positions
    ``[seq/cp]`` (global token positions, for rotary embeddings)."""

    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor


class BatchLoader:
    """Which samples (and which parts of them) this rank trains on at each step."""

    def __init__(self, source, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp: int = 1, cp_rank: int = 0, cp: int = 1, seed: int = 0):
        if global_batch % (micro_batch * dp):
            raise ValueError(f"global_batch={global_batch} is not divisible by micro_batch x dp "
                             f"= {micro_batch} x {dp}")
        self.source, self.global_batch, self.micro_batch = source, global_batch, micro_batch
        self.dp_rank, self.dp, self.cp_rank, self.cp, self.seed = dp_rank, dp, cp_rank, cp, seed
        self._orders: dict[int, torch.Tensor] = {}

    def order(self, epoch: int) -> torch.Tensor:
        """The sample indices in epoch ``epoch``'s order."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(derived_seed("order", self.seed, epoch))
            self._orders = {epoch: torch.randperm(self.source.num_samples, generator=g),
                            **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, samples of it consumed) before step ``step``: the data position."""
        return divmod(step * self.global_batch, self.source.num_samples)

    def sample_indices(self, step: int) -> list[list[int]]:
        """This DP rank's sample indices at ``step``, one list per micro-batch."""
        n = self.source.num_samples
        mine = range(step * self.global_batch + self.dp_rank, (step + 1) * self.global_batch,
                     self.dp)
        indices = [int(self.order(p // n)[p % n]) for p in mine]
        return [indices[m:m + self.micro_batch] for m in range(0, len(indices), self.micro_batch)]

    def micro_batches(self, step: int, device=None) -> list[MicroBatch]:
        out = []
        for indices in self.sample_indices(step):
            tokens = self.source.samples(indices)
            ids, labels = (self._my_part(t) for t in (tokens[:, :-1], tokens[:, 1:]))
            out.append(MicroBatch(ids.to(device), labels.to(device),
                                  self._my_part(torch.arange(self.source.seq)).to(device)))
        return out

    def _my_part(self, x: torch.Tensor) -> torch.Tensor:
        """This CP rank's tokens of ``x`` along its last dim (all of them at cp=1)."""
        if self.cp == 1:
            return x.contiguous()
        return split_for_context_parallel(x, self.cp_rank, self.cp, dim=x.dim() - 1)
