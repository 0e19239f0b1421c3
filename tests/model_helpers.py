"""Test-only views into MQATransformer, built from its public pieces (embed, alibi_bias, blocks)."""

from __future__ import annotations

import torch

from mqa_lm import MQATransformer


def attention_weights(model: MQATransformer, idx: torch.Tensor) -> list[torch.Tensor]:
    """Post-softmax attention of every layer, each [batch, heads, seq, seq], from the blocks'
    ``needs_weights=True`` path (the reference math)."""
    x = model.embed(idx)
    bias = model.alibi_bias(idx.device)
    weights = []
    for block in model.blocks:
        x, w, _ = block(x, bias=bias, needs_weights=True)
        weights.append(w)
    return weights
