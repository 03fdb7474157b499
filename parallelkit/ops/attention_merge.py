"""Log-sum-exp merge of attention partials, the combine step of ring attention.

Ring attention computes softmax attention one KV block at a time, so each block gives an output
normalised over that block only, plus its log-sum-exp. Rescaling both running and new outputs by
exp(lse - new_lse) turns them into the output normalised over all keys seen, without ever holding
the full score matrix.
"""

import torch

import parallelkit._native  # noqa: F401  registers torch.ops.parallelkit


def merge_attention_partials_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Folds one block's attention result into the running one, in place.

    Args:
        out: [..., s, d] float32 or float64, contiguous; the running output, updated.
        lse: [..., s] out's dtype, contiguous; the running log-sum-exp, updated. Start a ring
            with out = 0 and lse = -inf.
        block_out: [..., s, d] out's dtype, or float16/bfloat16 when out is float32.
        block_lse: [..., s] out's dtype.

    Leading dims are free (e.g. [b, heads, s, d]). Rows whose block_lse is -inf (fully masked
    block) are left unchanged; rows whose lse is -inf take the block. On CPU or CUDA, where
    built (parallelkit.build_info()["cuda_compiled"]).
    """
    torch.ops.parallelkit.merge_attention_partials_(out, lse, block_out, block_lse)
