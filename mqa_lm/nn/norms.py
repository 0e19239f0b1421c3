"""Normalisation layers, keyed by ``norm_type``.

The ``low_precision_*`` variants follow llm-foundry: under autocast they run in the autocast dtype
(bf16/fp16) instead of upcasting to fp32, which saves memory bandwidth at a small accuracy cost.
Without autocast they are identical to their full-precision twins.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mqa_lm.utils.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm_type")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` (autocast runs it in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-5, device: torch.device | str | None = None) -> None:
        super().__init__(dim, eps=eps, device=device)


@NORMS.register("low_precision_layernorm")
class LowPrecisionLayerNorm(LayerNorm):
    """LayerNorm computed in the autocast dtype rather than fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x.device.type)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(
                x.to(dtype), self.normalized_shape, _cast(self.weight, dtype), _cast(self.bias, dtype), self.eps
            )


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; statistics in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def _norm(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._norm(x, compute).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@NORMS.register("low_precision_rmsnorm")
class LowPrecisionRMSNorm(RMSNorm):
    """RMSNorm computed in the autocast dtype rather than fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x.device.type)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._norm(x, dtype)


def fusable_norm(module: nn.Module) -> dict[str, Any] | None:
    """How a kernel that fuses the norm into what follows computes ``module`` (keyword arguments of
    :func:`mqa_lm.kernels.triton.decode_linear.fused_linear`), or None for a norm it cannot. Without
    autocast the low-precision variants compute what their full-precision twins do."""
    if isinstance(module, LayerNorm) and module.weight is not None:
        return {"norm": "layernorm", "norm_weight": module.weight, "norm_bias": module.bias, "eps": module.eps}
    if isinstance(module, RMSNorm):
        return {"norm": "rmsnorm", "norm_weight": module.weight, "eps": module.eps}
    return None


DEFAULT_EPS = 1e-5


def build_norm(
    norm_type: str, dim: int, device: torch.device | str | None = None, eps: float = DEFAULT_EPS
) -> nn.Module:
    """Instantiate the norm registered under ``norm_type`` over the last ``dim`` features."""
    return NORMS.get(norm_type)(dim, eps=eps, device=device)
