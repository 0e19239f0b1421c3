"""Test-only views into MQATransformer, built from its public pieces (embed, alibi_bias, blocks)."""

from __future__ import annotations

import torch

from mqa_lm import MQAConfig, MQATransformer


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


def model_for(vocab: int, max_seq_len: int = 16, seed: int = 0, **overrides) -> MQATransformer:
    """A 2-layer MQA model in float64 (eval mode) whose weights are large enough (init_std 0.3) that
    attention, and so every position and cache detail, moves the logits."""
    torch.manual_seed(seed)
    config = MQAConfig(
        vocab_size=vocab,
        max_seq_len=max_seq_len,
        n_layers=2,
        d_model=32,
        heads=4,
        kv_heads=1,
        attn_impl="torch",
        init_std=0.3,
        **overrides,
    )
    return MQATransformer(config).double().eval()
