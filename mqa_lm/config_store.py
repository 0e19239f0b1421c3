"""Hydra config nodes built from the code's own defaults, so configs/ never repeats them.

``model/_base`` holds every :class:`mqa_lm.model.MQAConfig` field at its dataclass default, except
``vocab_size: null`` (training takes the tokenizer's size). Each ``configs/model/*.yaml`` lists it
first in its defaults and sets only what differs, so the composed ``cfg.model`` is still a plain
mapping of every field. ``generation/_base`` holds :class:`mqa_lm.inference.GenerationConfig`'s
defaults: ``generate.yaml`` puts them at its root and ``train.yaml`` under ``sample``. Registered on
import, which ``mqa_lm.training``, ``generate.py`` and the tests do before they compose.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from hydra.core.config_store import ConfigStore

from mqa_lm.inference.config import GenerationConfig
from mqa_lm.model import MQAConfig


def model_base() -> dict[str, Any]:
    """The ``model/_base`` node: MQAConfig's defaults, ``vocab_size`` left to the tokenizer."""
    values = {f.name: f.default for f in fields(MQAConfig)}
    values["vocab_size"] = None
    return values


def generation_base() -> dict[str, Any]:
    """The ``generation/_base`` node: GenerationConfig's defaults."""
    return {f.name: f.default for f in fields(GenerationConfig)}


ConfigStore.instance().store(group="model", name="_base", node=model_base())
ConfigStore.instance().store(group="generation", name="_base", node=generation_base())
