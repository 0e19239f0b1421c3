"""``generate(model, idx, ...)``: sampling from an :class:`~mqa_lm.model.MQATransformer`, a loop over its
forward on the :class:`~mqa_lm.inference.engine.InferenceEngine` (static cache, CUDA graph on GPU)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from mqa_lm.inference.config import GenerationConfig
from mqa_lm.inference.engine import InferenceEngine, cache_length, parameter_fingerprint

if TYPE_CHECKING:
    from mqa_lm.model import MQATransformer

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINES_PER_MODEL = 2  # each holds a whole cache; a few shapes in turn (training samples) fit


@torch.no_grad()
def generate(
    model: MQATransformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = GenerationConfig.temperature,
    top_k: int | None = GenerationConfig.top_k,
    top_p: float | None = GenerationConfig.top_p,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    *,
    prompt_mask: torch.Tensor | None = None,
    context_overflow: str = GenerationConfig.context_overflow,
) -> torch.Tensor:
    """``idx`` [batch, seq] followed by ``max_new_tokens`` sampled tokens per row.

    ``temperature`` 0 is greedy; ``top_k`` keeps the k likeliest tokens, ``top_p`` the smallest set
    whose probability reaches p. Rows that emitted ``eos_token_id`` keep emitting it, and the result
    ends where the last row did. ``prompt_mask`` [batch, seq] marks left padding (False). Past
    ``max_seq_len`` tokens ``context_overflow`` decides: ``slide`` (default; re-prefill the last half
    window), ``crop`` (each token from exactly the last ``max_seq_len``, as nanoGPT), ``error``.
    Sampled tokens come from uniforms drawn from ``generator`` up front, so a seed gives the same tokens
    whatever the prompt length. The model runs in eval mode for the call (dropout off).

    Engines (a cache each, and their CUDA graphs) are kept per model and reused across calls.
    """
    config = GenerationConfig(max_new_tokens, temperature, top_k, top_p, context_overflow=context_overflow)
    return generate_from_config(
        model, idx, config, eos_token_id=eos_token_id, generator=generator, prompt_mask=prompt_mask
    )


@torch.no_grad()
def generate_from_config(
    model: MQATransformer,
    idx: torch.Tensor,
    config: GenerationConfig,
    *,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`generate` with its settings as one validated :class:`GenerationConfig` (how train.py's
    sample and the samples callback pass theirs); ``config.stop_at_eos`` and ``config.seed`` are the
    caller's to turn into ``eos_token_id`` and ``generator``."""
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"idx must be integer token ids [batch, seq], got {getattr(idx, 'dtype', type(idx))}")
    if idx.shape[1] == 0:
        raise ValueError("generate needs at least one prompt token")
    model.check_token_ids(idx)  # once per call; the sampled ids are in range by construction
    was_training = model.training
    model.eval()
    try:
        engine = _engine(model, idx, config.max_new_tokens)
        return engine.generate(
            idx.to(engine.device), config, prompt_mask=prompt_mask, eos_token_id=eos_token_id, generator=generator
        ).to(idx.device)
    finally:
        model.train(was_training)


def _engine(model: MQATransformer, idx: torch.Tensor, max_new_tokens: int) -> InferenceEngine:
    """A cached engine for this model, batch and length; a new one where none fits."""
    config = model.config
    device = model.wte.weight.device
    needed = idx.shape[1] + max_new_tokens - 1
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    # Buffers made under inference_mode cannot be updated in place outside it (Lightning runs
    # validation hooks, and so training-time samples, under inference_mode).
    key = (device, idx.shape[0], cache_length(needed, config.max_seq_len), autocast, torch.is_inference_mode_enabled())
    engines = _ENGINES.setdefault(model, {})
    engine = engines.get(key)
    if engine is None or engine.fingerprint != parameter_fingerprint(model):
        engines.pop(key, None)
        while len(engines) >= _ENGINES_PER_MODEL:
            engines.pop(next(iter(engines)))
        engine = InferenceEngine(model, idx.shape[0], key[2])
        engines[key] = engine
    return engine


def clear_engines(model: MQATransformer) -> None:
    """Drop the engines (caches, CUDA graphs) ``generate`` keeps for ``model``."""
    _ENGINES.pop(model, None)
