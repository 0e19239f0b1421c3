"""``attn_impl='flash'``: FlashAttention, the best installed generation first.

1. FlashAttention-4 (package ``flash-attn-4``, ``flash_attn.cute.flash_attn_func``; Hopper/Blackwell);
2. the ``flash-attn`` package's FA2/FA3 API (``flash_attn.flash_attn_func``);
3. neither installed: PyTorch's built-in FlashAttention-2 kernel through SDPA's flash backend.

All read fewer K/V heads natively and align ``causal`` bottom-right (FA>=2.1 and FA4 do; the SDPA
fallback only where it coincides with top-left). CUDA and fp16/bf16 only. Calls these kernels
cannot express (bias, key padding, FA4 with dropout, a head_dim the kernel lacks, fp32 input) run on
the ``torch`` backend instead, with a note when ``verbose >= 1``; the weights come from the
reference math.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mqa_lm.kernels.common import AttentionBackend


@functools.cache
def fa4_func() -> Callable[..., Any] | None:
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return flash_attn_func


@functools.cache
def fa2_func() -> Callable[..., Any] | None:
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001
        return None
    return flash_attn_func


def flash_generation() -> str:
    """Which FlashAttention this process would use: 'fa4', 'fa2' or 'sdpa-flash'."""
    if fa4_func() is not None:
        return "fa4"
    if fa2_func() is not None:
        return "fa2"
    return "sdpa-flash"


FA4_HEAD_DIMS = (64, 96, 128)


class FlashBackend(AttentionBackend):
    name = "flash"

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(
                f"attn_impl='flash' runs on CUDA only, but the input is on {device}; "
                "use attn_impl='torch' (or 'auto') on this device"
            )

    def unsupported_on(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in (torch.float16, torch.bfloat16):
            return f"FlashAttention takes fp16/bf16, not {dtype} (enable autocast or cast the model)"
        return None

    def unsupported(self, q, k, *, causal, bias, key_padding_mask, dropout_p):  # type: ignore[override]
        if bias is not None:
            return "FlashAttention cannot add an arbitrary bias"
        if key_padding_mask is not None:
            return "FlashAttention's dense API takes no key padding mask"
        generation = flash_generation()
        head_dim, q_len, k_len = q.shape[-1], q.shape[2], k.shape[2]
        if generation == "fa4":
            if dropout_p > 0 and fa2_func() is None:
                return "FlashAttention-4 has no attention dropout"
            if head_dim not in FA4_HEAD_DIMS and fa2_func() is None:
                return f"FlashAttention-4 has no kernel for head_dim={head_dim}"
        if generation in ("fa2", "fa4") and (head_dim > 256 or head_dim % 8):
            return f"FlashAttention needs head_dim <= 256 and a multiple of 8, got {head_dim}"
        if generation == "sdpa-flash":
            if head_dim > 256 or head_dim % 8:
                return f"PyTorch's flash kernel needs head_dim <= 256 and a multiple of 8, got {head_dim}"
            if causal and 1 < q_len != k_len:
                return "PyTorch's flash kernel aligns causal top-left, so chunked prefill needs a mask"
        return None

    def __call__(self, q, k, v, *, softmax_scale, causal, bias, key_padding_mask, dropout_p):  # type: ignore[override]
        causal = causal and q.shape[2] > 1
        head_dim = q.shape[-1]
        fa4, fa2 = fa4_func(), fa2_func()
        if fa4 is not None and dropout_p == 0 and head_dim in FA4_HEAD_DIMS:
            # FA4 takes [batch, seq, heads, head_dim].
            out = fa4(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=softmax_scale, causal=causal
            )
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
        if fa2 is not None:
            out = fa2(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                dropout_p=dropout_p,
                softmax_scale=softmax_scale,
                causal=causal,
            )
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=dropout_p,
                is_causal=causal,
                scale=softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
