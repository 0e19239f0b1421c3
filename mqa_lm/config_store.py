"""Hydra config nodes built from the code's own defaults, so configs/ never repeats them.

* ``model/_base``: every :class:`mqa_lm.model.MQAConfig` field at its dataclass default, except
  ``vocab_size: null`` (training takes the tokenizer's size).
* ``optim/_adamw_base`` and ``optim/_muon_base``: every field of :class:`mqa_lm.optim.OptimConfig`
  and :class:`mqa_lm.optim.MuonConfig` at its default.
* ``data/_base``: every :class:`mqa_lm.data.DataConfig` field at its default, plus the datamodule's
  ``_target_``, with ``seed`` and ``cache_dir`` taken from the run (``${seed}``, ``${paths.data_dir}``).
* ``generation/_base``: :class:`mqa_lm.inference.GenerationConfig`'s defaults; ``generate.yaml`` puts
  them at its root and ``train.yaml`` under ``sample``.

Each ``configs/<group>/*.yaml`` lists its base first in its defaults and sets only what differs, so
the composed group is still a plain mapping of every field. Registered on import (``mqa_lm.training``,
``generate.py`` and the tests import this module before they compose).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from hydra.core.config_store import ConfigStore

from mqa_lm.data.config import DataConfig
from mqa_lm.inference.config import GenerationConfig
from mqa_lm.model import MQAConfig
from mqa_lm.optim import OPTIMIZERS

DATAMODULE_TARGET = "mqa_lm.data.TextDataModule"


def dataclass_defaults(config_cls: type) -> dict[str, Any]:
    """Every field of a config dataclass at its default (``default_factory`` called)."""
    values = {}
    for f in fields(config_cls):
        factory = f.default_factory
        values[f.name] = factory() if factory is not MISSING else f.default
    return values


def model_base() -> dict[str, Any]:
    """The ``model/_base`` node: MQAConfig's defaults, ``vocab_size`` left to the tokenizer."""
    return {**dataclass_defaults(MQAConfig), "vocab_size": None}


def optim_base(name: str) -> dict[str, Any]:
    """The ``optim/_<name>_base`` node: the defaults of that optimizer's config class."""
    return dataclass_defaults(OPTIMIZERS[name])


def data_base() -> dict[str, Any]:
    """The ``data/_base`` node: DataConfig's defaults; the seed and the cache follow the run."""
    return {
        "_target_": DATAMODULE_TARGET,
        **dataclass_defaults(DataConfig),
        "seed": "${seed}",  # batches are a function of (seed, micro-batch, rank)
        "cache_dir": "${paths.data_dir}",  # the checkout's data/ (git-ignored), wherever you launch from
    }


_store = ConfigStore.instance()
_store.store(group="model", name="_base", node=model_base())
for _name in OPTIMIZERS:
    _store.store(group="optim", name=f"_{_name}_base", node=optim_base(_name))
_store.store(group="data", name="_base", node=data_base())
_store.store(group="generation", name="_base", node=dataclass_defaults(GenerationConfig))
