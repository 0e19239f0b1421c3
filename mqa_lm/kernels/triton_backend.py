"""``attn_impl='triton'``: our MQA/GQA flash-attention kernels in Triton.

Until the kernels are importable, and whenever they cannot run on the input's device (CPU without
``TRITON_INTERPRET=1``), every call runs on the ``torch`` backend with a once-only note at
``verbose >= 1``. It never fails for lack of a GPU.
"""

from __future__ import annotations

import os

import torch

from mqa_lm.kernels.common import AttentionBackend


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether our Triton kernels can run on tensors of ``device``."""
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


class TritonBackend(AttentionBackend):
    name = "triton"

    def unsupported(self, q, k, *, causal, bias, key_padding_mask, dropout_p):  # type: ignore[override]
        return "the Triton MQA kernels are not built yet"

    def __call__(self, q, k, v, *, softmax_scale, causal, bias, key_padding_mask, dropout_p):  # type: ignore[override]
        raise NotImplementedError("the Triton MQA kernels are not built yet")
