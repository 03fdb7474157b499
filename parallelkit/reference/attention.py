"""Reference for softmax attention over one block of keys with its log-sum-exp (see
parallelkit.ops.attention_block). Differentiable, so tests take the gradients of the full
attention from it with torch.autograd."""

import torch


def attention_block_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, q_offset: int = 0,
    k_offset: int = 0, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Computes in float64, whatever the inputs' dtype.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] with H % Hkv == 0 (query head h reads kv head
            h // (H // Hkv)).
        causal: key j is visible to query i iff k_offset + j <= q_offset + i (global positions).
        scale: score multiplier, default D ** -0.5.

    Returns:
        out: [B, H, Sq, D] float64, softmax over the visible keys applied to v (0 for a row with
        no visible key); lse: [B, H, Sq] float64 log-sum-exp of the scaled visible scores (-inf
        for such a row).
    """
    group = q.shape[1] // k.shape[1]
    q = q.double()
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = scale * q @ k.transpose(-1, -2)  # [B, H, Sq, Sk]
    if causal:
        q_pos = q_offset + torch.arange(q.shape[2], device=q.device)
        k_pos = k_offset + torch.arange(k.shape[2], device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # softmax(scores) would be 0/0 = NaN for a fully masked row; shifting by 0 there gives 0.
    probs = torch.exp(scores - torch.where(lse == float("-inf"), 0.0, lse).unsqueeze(-1))
    return probs @ v, lse
