"""``generate(model, idx, ...)``: sampling from an :class:`~mqa_lm.model.MQATransformer`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mqa_lm.inference.engine import engine_generate

if TYPE_CHECKING:
    from mqa_lm.model import MQATransformer
    from mqa_lm.nn.attention import KVCache


@torch.no_grad()
def generate(
    model: MQATransformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` after ``idx`` [batch, seq] with the KV cache.

    ``temperature`` 0 is greedy; ``top_k`` keeps the k likeliest tokens, ``top_p`` the smallest
    set whose probability reaches p. Rows that emitted ``eos_token_id`` keep emitting it, and
    generation stops once every row has. Past ``max_seq_len`` the context is the last
    ``max_seq_len`` tokens, exactly as nanoGPT crops: the cache cannot slide (positions are
    absolute), so each such step re-runs that window without a cache.

    Runs on :mod:`mqa_lm.inference`'s static-cache engine (a CUDA graph per step on GPU) when
    prompt + new tokens fit in ``max_seq_len`` (env ``MQA_LM_GENERATE_ENGINE=0`` opts out);
    sampled tokens then come from uniforms drawn from ``generator`` up front.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
    if idx.shape[1] == 0:
        raise ValueError("generate needs at least one prompt token")
    model.check_token_ids(idx)  # once per call; the sampled ids are in range by construction
    # The static-cache engine (CUDA graph on GPU) whenever the context never slides.
    fast = engine_generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
    if fast is not None:
        return fast
    return generate_with_growing_cache(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)


@torch.no_grad()
def generate_with_growing_cache(
    model: MQATransformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:meth:`generate` on the ``decode`` path (the cache grows by concatenation), which also
    slides the context past ``max_seq_len``; arguments are assumed valid."""
    limit = model.config.max_seq_len
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache: list[KVCache] | None = None
    next_input = idx[:, -limit:]
    for _ in range(max_new_tokens):
        if cache is not None and cache[0][0].shape[2] + next_input.shape[1] > limit:
            cache, next_input = None, idx[:, -limit:]
        logits, cache = model.decode(next_input, cache)
        token = sample_next_token(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        idx = torch.cat([idx, token[:, None]], dim=1)
        next_input = token[:, None]
        if eos_token_id is not None and bool(finished.all()):
            break
    return idx


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [batch, vocab] (greedy when temperature is 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
