"""The feed-forward half of a transformer block: GELU (GPT-2) or SwiGLU (LLaMA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mqa_lm.nn.linears import build_linear


class MLP(nn.Module):
    """``gelu``: down(gelu(up(x))); ``swiglu``: down(silu(gate(x)) * up(x)) with a fused gate/up."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        mlp_type: str = "gelu",
        fc_type: str = "torch",
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if mlp_type not in ("gelu", "swiglu"):
            raise ValueError(f"unknown mlp_type {mlp_type!r}; valid choices are: gelu, swiglu")
        self.mlp_type = mlp_type
        self.hidden = hidden
        up_out = 2 * hidden if mlp_type == "swiglu" else hidden
        self.up_proj = build_linear(fc_type, dim, up_out, bias=bias, device=device)
        self.down_proj = build_linear(fc_type, hidden, dim, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        if self.mlp_type == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down_proj(h)
