"""Reference for softmax attention over one block of keys with its log-sum-exp (see
parallelkit.ops.attention_block). Differentiable, so tests take the gradients of the full
attention from it with torch.autograd."""

import torch


def attention_block_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, q_offset: int = 0,
    k_offset: int = 0, scale: float | None = None, q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None, q_documents: torch.Tensor | None = None,
    k_documents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Computes in float64, whatever the inputs' dtype.

    Args:
        q: [B, H, Sq, D]; k, v: [B, Hkv, Sk, D] with H % Hkv == 0 (query head h reads kv head
            h // (H // Hkv)).
        causal: key j is visible to query i iff its position is not after the query's.
        q_offset, k_offset: positions are q_offset + i and k_offset + j, unless
        q_positions, k_positions: [Sq] / [Sk] or [B, Sq] / [B, Sk] positions are given.
        q_documents, k_documents: document ids shaped as the positions; a key is visible only to
            queries of its own document. None: one document.
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
    if q_positions is None:
        q_positions = q_offset + torch.arange(q.shape[2], device=q.device)
    if k_positions is None:
        k_positions = k_offset + torch.arange(k.shape[2], device=q.device)
    hidden = torch.zeros(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        hidden = hidden | (k_positions[..., None, :] > q_positions[..., :, None])
    if q_documents is not None:
        hidden = hidden | (k_documents[..., None, :] != q_documents[..., :, None])
    if hidden.dim() == 3:  # per batch row: [B, 1, Sq, Sk] over the heads
        hidden = hidden[:, None]
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # softmax(scores) would be 0/0 = NaN for a fully masked row; shifting by 0 there gives 0.
    probs = torch.exp(scores - torch.where(lse == float("-inf"), 0.0, lse).unsqueeze(-1))
    return probs @ v, lse
