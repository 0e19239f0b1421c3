"""``attn_impl='torch'``: PyTorch's scaled_dot_product_attention, which picks the cuDNN, flash,
memory-efficient or math kernel itself and reads fewer K/V heads natively (``enable_gqa``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mqa_lm.kernels.common import AttentionBackend, allowed_keys, split_empty_rows


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if bias is None and key_padding_mask is None and (not causal or q_len == 1 or q_len == k_len):
        # is_causal is top-left aligned, which equals bottom-right only for square attention, and a
        # single query row sees every key either way.
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal and q_len > 1, scale=softmax_scale, enable_gqa=gqa
        )

    allowed, row_has_keys = split_empty_rows(
        allowed_keys(q_len, k_len, causal, key_padding_mask, q.device), key_padding_mask
    )
    if bias is None:
        attn_mask = allowed
    else:
        attn_mask = centered_bias(bias, allowed, q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=softmax_scale, enable_gqa=gqa
    )
    if row_has_keys is not None:
        out = out * row_has_keys.to(out.dtype)
    return out


def centered_bias(bias: torch.Tensor, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask SDPA takes (in ``dtype``): ``bias`` with disallowed keys at the dtype's
    minimum and each row shifted so its largest allowed entry is 0.

    Softmax ignores a per-row constant, and the shift keeps the entries that carry weight near 0,
    where bf16/fp16 are fine-grained: an ALiBi row aligned to the newest key reaches
    ``-slope * seq_len`` for early queries, where bf16 steps are whole units.
    """
    compute = torch.promote_types(dtype, torch.float32)
    shifted = bias.to(compute)
    if allowed is not None:
        shifted = shifted.masked_fill(~allowed, float("-inf"))
    shifted = shifted - shifted.amax(dim=-1, keepdim=True)
    return shifted.to(dtype).nan_to_num(neginf=torch.finfo(dtype).min)


class TorchBackend(AttentionBackend):
    """SDPA for every call; the block sends calls that need weights to the reference math."""

    name = "torch"

    def __call__(self, q, k, v, *, softmax_scale, causal, bias, key_padding_mask, dropout_p):  # type: ignore[override]
        return sdpa_attention(
            q,
            k,
            v,
            softmax_scale=softmax_scale,
            causal=causal,
            bias=bias,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
        )
