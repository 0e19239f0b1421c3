"""Flash attention for MQA/GQA in Triton as PyTorch sees it: :func:`triton_attention` (checked
inputs, autograd in eager mode) and the ``torch.library`` custom ops ``mqa_lm::triton_attention_fwd``
and ``_bwd`` that ``torch.compile`` traces through. The kernels are in
:mod:`~mqa_lm.kernels.triton.attention_kernels`, their launches in :mod:`~mqa_lm.kernels.triton.attention_launch`.
"""

from __future__ import annotations

import math

import torch

from mqa_lm.kernels.triton.attention_launch import MAX_HEAD_DIM, attention_backward, attention_forward

# ----------------------------------------------------------------------------------------------
# torch.library custom op (so torch.compile traces through it) and the public function
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "mqa_lm::triton_attention_fwd",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? key_padding_mask, float softmax_scale, "
    "bool causal) -> (Tensor, Tensor)",
)
def _fwd_op(q, k, v, bias, key_padding_mask, softmax_scale, causal):
    return attention_forward(
        q, k, v, softmax_scale=softmax_scale, causal=causal, bias=bias, key_padding_mask=key_padding_mask
    )


@_fwd_op.register_fake
def _fwd_op_fake(q, k, v, bias, key_padding_mask, softmax_scale, causal):
    batch, heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    out = q.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)
    lse = q.new_empty(batch * kv_heads, q_len * (heads // kv_heads), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(
    "mqa_lm::triton_attention_bwd",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, "
    "Tensor? key_padding_mask, float softmax_scale, bool causal) -> (Tensor, Tensor, Tensor)",
)
def _bwd_op(grad_out, q, k, v, out, lse, bias, key_padding_mask, softmax_scale, causal):
    # A custom op's outputs may not alias one another: dK and dV get buffers of their own here.
    batch, kv_heads, k_len, head_dim = k.shape
    dk = k.new_empty(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    dv = v.new_empty(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    return attention_backward(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        softmax_scale=softmax_scale,
        causal=causal,
        bias=bias,
        key_padding_mask=key_padding_mask,
        dk=dk,
        dv=dv,
    )


@_bwd_op.register_fake
def _bwd_op_fake(grad_out, q, k, v, out, lse, bias, key_padding_mask, softmax_scale, causal):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    dq = q.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)
    dk = k.new_empty(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    dv = v.new_empty(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, bias, key_padding_mask, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, key_padding_mask)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, bias, key_padding_mask, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager mode: the custom op's dispatch
    costs host time on every call (more than a kernel launch), and eager needs no tracing."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, softmax_scale, causal):
        out, lse = attention_forward(
            q, k, v, softmax_scale=softmax_scale, causal=causal, bias=bias, key_padding_mask=key_padding_mask
        )
        ctx.save_for_backward(q, k, v, out, lse, bias, key_padding_mask)
        ctx.softmax_scale = softmax_scale
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            softmax_scale=ctx.softmax_scale,
            causal=ctx.causal,
            bias=bias,
            key_padding_mask=key_padding_mask,
        )
        return dq, dk, dv, None, None, None, None


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> None:
    """Raise TypeError/ValueError naming the first input these kernels cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {list(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {list(k.shape)} and v {list(v.shape)} must have the same shape")
    batch, heads, q_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v shape {list(k.shape)} must be [batch={batch}, kv_heads, k_len, head_dim={head_dim}] to match q"
        )
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={k.shape[1]} (1 = MQA, heads = MHA)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton attention kernels take fp16/bf16 (fp32 on CPU), got {q.dtype}")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise TypeError("the Triton attention kernels take fp16/bf16 on CUDA; cast to bf16 or use attn_impl='torch'")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} exceeds the kernels' limit of {MAX_HEAD_DIM}; use attn_impl='torch'")
    k_len = k.shape[2]
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point additive tensor, got {bias.dtype}")
        shape = (batch, heads, q_len, k_len)
        if bias.dim() != 4 or any(s not in (1, full) for s, full in zip(bias.shape, shape)):
            raise ValueError(f"bias of shape {list(bias.shape)} must be 4-D and broadcastable to {list(shape)}")
        if bias.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "the Triton kernels do not compute a gradient for bias; detach it or use attn_impl='torch'"
            )
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q on {q.device}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, k_len):
            raise ValueError(
                f"key_padding_mask must have shape [batch={batch}, k_len={k_len}], got {list(key_padding_mask.shape)}"
            )
        if key_padding_mask.is_floating_point():
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q on {q.device}")


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash attention of q [b, h, q_len, d] over k, v [b, kv_heads, k_len, d]; differentiable in
    q, k and v, traceable by ``torch.compile`` (through the custom op ``mqa_lm::triton_attention_fwd``;
    eager calls skip its dispatch).

    ``causal`` is aligned bottom-right (query ``i`` sees key ``j`` iff ``j <= i + k_len - q_len``);
    ``bias`` is additive, 4-D and broadcastable to [b, h, q_len, k_len] (no gradient);
    ``key_padding_mask`` is bool [b, k_len], True = attend. A query that sees no key outputs zeros.
    Runs on CUDA (fp16/bf16), or on CPU tensors under ``TRITON_INTERPRET=1`` (fp32/fp16 too).
    """
    check_attention_inputs(q, k, v, bias, key_padding_mask)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    if torch.compiler.is_compiling():
        out, _ = _fwd_op(q, k, v, bias, key_padding_mask, float(softmax_scale), bool(causal))
        return out
    return _EagerAttention.apply(q, k, v, bias, key_padding_mask, float(softmax_scale), bool(causal))
