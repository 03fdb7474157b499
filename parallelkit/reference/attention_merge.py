"""Reference for the log-sum-exp merge of attention partials (see parallelkit.ops.attention_merge)."""

import torch


def merge_attention_partials(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place; computes in out's dtype (pass float64 for an exact reference).

    Args:
        out: [..., s, d] running attention output over the keys seen so far.
        lse: [..., s] running log-sum-exp of the attention scores over those keys.
        block_out: [..., s, d] output over one new block of keys (cast to out's dtype).
        block_lse: [..., s] log-sum-exp over that block.

    Returns:
        (out, lse) over all keys. A row with block_lse = -inf keeps out and lse; a row with
        lse = -inf takes the block whatever out held (a zero weight drops its term, since 0 * NaN
        would be NaN).
    """
    block_out = block_out.to(out.dtype)
    new_lse = torch.logaddexp(lse, block_lse)
    # Both -inf: logaddexp gives -inf and -inf - (-inf) is NaN, so such rows are put back below.
    out_weight = torch.exp(lse - new_lse).unsqueeze(-1)
    block_weight = torch.exp(block_lse - new_lse).unsqueeze(-1)
    merged = torch.where(out_weight == 0, 0, out * out_weight) + torch.where(
        block_weight == 0, 0, block_out * block_weight
    )
    block_masked = block_lse == float("-inf")
    merged = torch.where(block_masked.unsqueeze(-1), out, merged)
    return merged, torch.where(block_masked, lse, new_lse)
