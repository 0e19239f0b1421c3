"""Position encodings: rotary (RoPE, applied inside attention) and ALiBi (an additive bias)."""

from __future__ import annotations

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """GPT-NeoX-style rotary embedding ("rotate half") over the full head dimension.

    ``forward(x, offset)`` rotates ``x`` [batch, heads, seq, head_dim] as if its rows sat at absolute
    positions ``offset .. offset + seq - 1``, so cached keys keep the rotation of their position.
    ``at(x, positions)`` rotates each row by its own positions [batch, seq] (left-padded batches, a
    decode step in a CUDA graph): a gather from tables of ``max_positions`` rows, made once per
    (device, dtype) and never regrown, so a captured graph keeps reading the same memory.

    The angles are computed in fp64 and the cos/sin tables cached per (device, dtype), grown on
    demand. Nothing is stored as a buffer: ``model.to(torch.bfloat16)`` would otherwise round the
    inverse frequencies to bf16 and rotate every position by a wrong angle.
    """

    DEFAULT_MAX_POSITIONS = 2048

    def __init__(self, head_dim: int, theta: float = 10000.0, max_positions: int = DEFAULT_MAX_POSITIONS) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.max_positions = max_positions
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        # What at() reads: kept apart from the growing tables, so that growing them never frees it.
        self._fixed: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [>= length, head_dim] for positions 0.. (the cached tensors, grown on demand)."""
        cached = self._tables.get((device, dtype))
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 2 * (0 if cached is None else cached[0].shape[0]))
            # fp64 on the CPU: position * frequency loses ~1e-4 rad at position 4096 in fp32.
            inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            freqs = torch.outer(torch.arange(size, dtype=torch.float64), inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            cached = (angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype))
            self._tables[(device, dtype)] = cached
        return cached

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        seq = x.shape[-2]
        cos, sin = self.cos_sin(offset + seq, x.device, x.dtype)
        return apply_rotary(x, cos[offset : offset + seq], sin[offset : offset + seq])

    def at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` [batch, heads, seq, head_dim] rotated by ``positions`` [batch, seq] (< ``max_positions``)."""
        key = (x.device, x.dtype)
        tables = self._fixed.get(key)
        if tables is None:
            cos, sin = self.cos_sin(self.max_positions, x.device, x.dtype)
            tables = self._fixed[key] = (cos[: self.max_positions], sin[: self.max_positions])
        cos, sin = tables
        return apply_rotary(x, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., head_dim] by angles whose cos/sin broadcast against it ("rotate half")."""
    half = x.shape[-1] // 2
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
