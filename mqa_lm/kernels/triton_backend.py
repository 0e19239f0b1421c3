"""``attn_impl='triton'``: our MQA/GQA flash-attention kernels (:mod:`mqa_lm.kernels.triton.attention`).

They run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was
imported (how CI and users debug them). Anything else a call needs that the kernels cannot do
(no Triton, CPU without the interpreter, attention dropout, a bias that wants a gradient, fp32 on
CUDA, head_dim > 256) is named by ``unsupported`` and that call runs on the ``torch`` backend, with
a once-only note at ``verbose >= 1``. It never fails for lack of a GPU.
"""

from __future__ import annotations

import functools

import torch

from mqa_lm.kernels.common import AttentionBackend, triton_interpreting


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Whether our Triton kernels can run on tensors of ``device``."""
    runs = device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    return runs and triton_importable()  # importing Triton (~0.2 s) only where it could run


class TritonBackend(AttentionBackend):
    name = "triton"

    def unsupported_on(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if not triton_runs_on(device):
            if not triton_importable():
                return "Triton is not installed"
            return f"the Triton kernels need CUDA, or TRITON_INTERPRET=1 for {device.type} tensors"
        if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
            return f"the Triton kernels take fp16/bf16 on CUDA, not {dtype} (enable autocast or cast the model)"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"the Triton kernels take fp16/bf16/fp32, not {dtype}"
        return None

    def unsupported(self, q, k, *, causal, bias, key_padding_mask, dropout_p):  # type: ignore[override]
        if dropout_p > 0:
            return "the Triton kernels have no attention dropout (attn_pdrop > 0 in training)"
        if bias is not None and bias.requires_grad and torch.is_grad_enabled():
            return "the Triton kernels compute no gradient for bias, and this bias requires one"
        if q.shape[-1] > 256:
            return f"the Triton kernels support head_dim <= 256, got {q.shape[-1]}"
        return None

    def __call__(self, q, k, v, *, softmax_scale, causal, bias, key_padding_mask, dropout_p):  # type: ignore[override]
        from mqa_lm.kernels.triton.attention import triton_attention

        return triton_attention(
            q, k, v, softmax_scale=softmax_scale, causal=causal, bias=bias, key_padding_mask=key_padding_mask
        )
