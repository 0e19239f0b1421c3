"""Linear layers, keyed by ``fc_type``: ``torch`` (nn.Linear) and ``te`` (TransformerEngine)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mqa_lm.utils.registry import Registry

LINEARS: Registry[Callable[..., nn.Module]] = Registry("fc_type")


@LINEARS.register("torch")
def torch_linear(
    in_features: int, out_features: int, bias: bool = True, device: torch.device | str | None = None
) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias, device=device)


@LINEARS.register("te")
def te_linear(
    in_features: int, out_features: int, bias: bool = True, device: torch.device | str | None = None
) -> nn.Module:
    try:
        import transformer_engine.pytorch as te
    except ImportError as err:
        raise ImportError(
            "fc_type='te' needs NVIDIA TransformerEngine, which is not importable here "
            f"({err}). Install it on a CUDA machine with `pip install --no-build-isolation "
            "'transformer_engine[pytorch]'`, or use fc_type='torch'."
        ) from err
    return te.Linear(in_features, out_features, bias=bias, device="cuda" if device is None else device)


def build_linear(
    fc_type: str, in_features: int, out_features: int, bias: bool = True, device: torch.device | str | None = None
) -> nn.Module:
    """Instantiate the linear registered under ``fc_type``."""
    return LINEARS.get(fc_type)(in_features, out_features, bias=bias, device=device)
