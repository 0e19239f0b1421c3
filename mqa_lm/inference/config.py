"""``GenerationConfig``: how to sample, validated in one place, with one set of defaults.

It is the one object that travels: ``generate.py`` (``configs/generate.yaml``), the end-of-run sample
of ``train.py`` (``sample.*``), the samples callback and lm-eval's generation settings build one,
validated once, and hand it on through ``generate_from_config`` / ``generate_ids`` to
``InferenceEngine.stream``, which turns it into the decode step's settings in one place
(``InferenceEngine.settings``). ``generate()`` keeps its keyword arguments (nanoGPT's signature) and
builds one from them. The Hydra configs get the fields and defaults from ``generation/_base``, built
from this dataclass.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, fields
from typing import Any, ClassVar

from mqa_lm.utils.config import DictRoundTrip, check_int, check_numbers

CONTEXT_OVERFLOW = ("slide", "crop", "error")


@dataclass
class GenerationConfig(DictRoundTrip):
    """Sampling settings; ``__post_init__`` raises one ValueError naming the first bad field
    (``prefix`` + field name: ``sample.temperature``, ``callbacks.samples.top_k``, ...).

    Attributes:
        max_new_tokens: tokens to generate per row (0: none).
        temperature: 0 is greedy; otherwise logits are divided by it before sampling.
        top_k: keep the ``k`` likeliest tokens (None: all).
        top_p: keep the smallest set whose probability reaches ``p`` (None or 1: all).
        stop_at_eos: end a row at the tokenizer's ``<|endoftext|>``.
        seed: the sampling generator's seed (the same seed gives the same tokens).
        context_overflow: past the model's ``max_seq_len``: ``slide`` (re-prefill the last half
            window), ``crop`` (every token from exactly the last ``max_seq_len``, as nanoGPT), ``error``.
    """

    config_group: ClassVar[str] = "generation"

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    stop_at_eos: bool = True
    seed: int = 1
    context_overflow: str = "slide"
    prefix: InitVar[str] = ""

    def __post_init__(self, prefix: str) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"{prefix}{name} must be {want}, got {getattr(self, name)!r}")

        check_int(self.max_new_tokens, f"{prefix}max_new_tokens", minimum=0)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad("temperature", ">= 0 (0 = greedy)")
        if not self.temperature >= 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        check_int(self.top_k, f"{prefix}top_k", none_ok=True, hint="null keeps all tokens")
        if self.top_p is not None and (
            isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1
        ):
            raise bad("top_p", "in (0, 1] (or null)")
        if not isinstance(self.stop_at_eos, bool):
            raise bad("stop_at_eos", "true or false")
        check_int(self.seed, f"{prefix}seed", minimum=None)
        if self.context_overflow not in CONTEXT_OVERFLOW:
            raise bad("context_overflow", f"one of {', '.join(CONTEXT_OVERFLOW)}")
        self.temperature = float(self.temperature)
        self.top_p = None if self.top_p is None else float(self.top_p)

    @classmethod
    def from_dict(cls, values: dict[str, Any], prefix: str = "") -> GenerationConfig:  # type: ignore[override]
        """From a config group's plain dict; unknown keys and bad values name ``prefix`` + the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            names = ", ".join(prefix + k for k in unknown)
            raise ValueError(f"unknown key(s) {names}; valid keys are: {', '.join(sorted(known))}")
        check_numbers(cls, values, prefix)
        return cls(**values, prefix=prefix)
