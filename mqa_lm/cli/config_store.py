"""Hydra config nodes built from the code's own dataclasses, so configs/ never repeats a default.

Each command registers the nodes its config composes, before Hydra composes it
(``register("generation", "model_source")`` in ``generate.py``), and imports nothing it does not compose:

* ``generation/_base``: :class:`mqa_lm.inference.GenerationConfig`'s defaults; ``generate.yaml``
  puts them at its root and ``train.yaml`` under ``sample``;
* ``model_source/_base``: :class:`mqa_lm.cli.options.ModelSource` (``ckpt_path``, ``tokenizer_path``,
  ``device``, ``dtype``) at the root of ``generate.yaml`` and ``eval.yaml``;
* ``harness/_base``: :class:`mqa_lm.evaluation.tasks.HarnessOptions` (``tasks``, ``include_path``,
  ``num_fewshot``, ``limit``, ``batch_size``) at the root of ``eval.yaml`` and in ``callbacks.lm_eval``.

The training groups' nodes (``model``, ``optim``, ``data``) are :mod:`mqa_lm.training.config_store`'s,
built with :func:`dataclass_defaults` as well.
"""

from __future__ import annotations

import importlib
from dataclasses import MISSING, fields
from typing import Any

from hydra.core.config_store import ConfigStore

# group -> the dataclass (module, name) whose defaults are its _base node.
SHARED_NODES = {
    "generation": ("mqa_lm.inference.config", "GenerationConfig"),
    "model_source": ("mqa_lm.cli.options", "ModelSource"),
    "harness": ("mqa_lm.evaluation.tasks", "HarnessOptions"),
}


def dataclass_defaults(config_cls: type) -> dict[str, Any]:
    """Every field of a config dataclass at its default (``default_factory`` called)."""
    values = {}
    for f in fields(config_cls):
        factory = f.default_factory
        values[f.name] = factory() if factory is not MISSING else f.default
    return values


def store(group: str, name: str, node: dict[str, Any]) -> None:
    """``node`` as ``<group>/<name>`` in Hydra's ConfigStore (a name stored again is replaced)."""
    ConfigStore.instance().store(group=group, name=name, node=node)


def register(*groups: str) -> None:
    """Store ``<group>/_base`` for each of ``groups`` (keys of :data:`SHARED_NODES`)."""
    for group in groups:
        module, name = SHARED_NODES[group]
        store(group, "_base", dataclass_defaults(getattr(importlib.import_module(module), name)))
