"""Position encodings: rotary (RoPE, applied inside attention) and ALiBi (an additive bias)."""

from __future__ import annotations

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """GPT-NeoX-style rotary embedding ("rotate half") over the full head dimension.

    ``forward(x, offset)`` rotates ``x`` [batch, heads, seq, head_dim] as if its rows sat at absolute
    positions ``offset .. offset + seq - 1``, so cached keys keep the rotation of their position.
    The cos/sin tables are computed in fp32 and grown on demand.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != device:
            size = max(length, 2 * (0 if self._cos is None else self._cos.shape[0]))
            positions = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq.to(device))
            angles = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = angles.cos(), angles.sin()
        return self._cos, self._sin

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        seq = x.shape[-2]
        cos, sin = self._tables(offset + seq, x.device)
        cos = cos[offset : offset + seq].to(x.dtype)
        sin = sin[offset : offset + seq].to(x.dtype)
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def alibi_slopes(heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al.), including the interleaving for non-powers of two."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(heads: int, max_seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi as an additive bias [1, heads, 1, max_seq_len].

    Entry ``j`` is ``-slope * (max_seq_len - 1 - j)``: the distance to the newest key. For causal
    attention softmax ignores per-row constants, so this equals ``-slope * (i - j)`` for every query
    ``i``; the block crops it to the last ``k_len`` columns, so one tensor serves every length.
    """
    distance = torch.arange(1 - max_seq_len, 1, device=device, dtype=torch.float32)
    return (alibi_slopes(heads).to(device)[:, None] * distance[None, :])[None, :, None, :]
