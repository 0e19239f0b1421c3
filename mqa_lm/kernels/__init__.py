"""Attention backends as functions on tensors, keyed by ``attn_impl``.

``ATTENTION_BACKENDS.get(name)`` returns an :class:`AttentionBackend`; ``resolve_impl`` turns
``auto`` (and ``triton`` where Triton cannot run) into a concrete backend for one call.
"""

from __future__ import annotations

import torch

from mqa_lm.kernels.common import AttentionBackend, allowed_keys
from mqa_lm.kernels.flash import FlashBackend
from mqa_lm.kernels.reference import reference_attention
from mqa_lm.kernels.sdpa import TorchBackend, sdpa_attention
from mqa_lm.kernels.triton_backend import TritonBackend, triton_runs_on
from mqa_lm.registry import Registry

ATTENTION_BACKENDS: Registry[AttentionBackend] = Registry("attn_impl")
ATTENTION_BACKENDS.register("torch")(TorchBackend())
ATTENTION_BACKENDS.register("flash")(FlashBackend())
ATTENTION_BACKENDS.register("triton")(TritonBackend())
# 'auto' is resolved per call (see resolve_impl); registering it keeps the list of valid names whole.
ATTENTION_BACKENDS.register("auto")(AttentionBackend())


def resolve_impl(attn_impl: str, device: torch.device) -> str:
    """``auto`` means triton where its kernels can run on ``device``, else torch."""
    if attn_impl == "auto":
        return "triton" if triton_runs_on(device) else "torch"
    return attn_impl


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "allowed_keys",
    "reference_attention",
    "resolve_impl",
    "sdpa_attention",
]
