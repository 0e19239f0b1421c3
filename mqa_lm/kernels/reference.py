"""The explicit-math attention: the semantics every backend must match, and the only path that
returns the attention weights. Scores and softmax run in fp32 (fp64 for fp64 inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mqa_lm.kernels.common import allowed_keys, split_empty_rows


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (context [b, h, q_len, d], post-softmax weights [b, h, q_len, k_len]).

    The weights are the softmax distribution before dropout; dropout, when ``dropout_p > 0``, is
    applied to the copy that multiplies the values.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    compute = torch.promote_types(q.dtype, torch.float32)

    # Group query heads per K/V head instead of repeating K/V: no copy of the cache.
    q_grouped = q.to(compute).reshape(batch, kv_heads, group, q_len, head_dim)
    scores = torch.einsum("bkgqd,bksd->bkgqs", q_grouped, k.to(compute)) * softmax_scale
    scores = scores.reshape(batch, heads, q_len, k_len)
    if bias is not None:
        scores = scores + bias.to(compute)

    allowed, row_has_keys = split_empty_rows(
        allowed_keys(q_len, k_len, causal, key_padding_mask, q.device), key_padding_mask
    )
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if row_has_keys is not None:
        probs = probs * row_has_keys

    dropped = F.dropout(probs, p=dropout_p, training=True) if dropout_p > 0 else probs
    context = torch.einsum(
        "bkgqs,bksd->bkgqd", dropped.reshape(batch, kv_heads, group, q_len, k_len), v.to(compute)
    ).reshape(batch, heads, q_len, head_dim)
    return context.to(q.dtype), probs.to(q.dtype)
