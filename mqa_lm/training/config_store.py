"""The training groups' Hydra nodes, built from the code's own defaults so configs/ never repeats them.

* ``model/_base``: every :class:`mqa_lm.model.MQAConfig` field at its dataclass default, except
  ``vocab_size: null`` (training takes the tokenizer's size).
* ``optim/_adamw_base`` and ``optim/_muon_base``: every field of :class:`mqa_lm.optim.OptimConfig`
  and :class:`mqa_lm.optim.MuonConfig` at its default.
* ``data/_base``: every :class:`mqa_lm.data.DataConfig` field at its default, plus the datamodule's
  ``_target_``, with ``seed`` and ``cache_dir`` taken from the run (``${seed}``, ``${paths.data_dir}``).

Each ``configs/<group>/*.yaml`` lists its base first in its defaults and sets only what differs, so
the composed group is still a plain mapping of every field. Registered on import (``mqa_lm.training.run``
and the tests import this module before they compose), together with :mod:`mqa_lm.cli.config_store`'s
``generation/_base`` (``train.yaml``'s ``sample``) and ``harness/_base`` (``callbacks.lm_eval``).
"""

from __future__ import annotations

from typing import Any

from mqa_lm.cli.config_store import dataclass_defaults, register, store
from mqa_lm.data.config import DataConfig
from mqa_lm.model import MQAConfig
from mqa_lm.optim import OPTIMIZERS

DATAMODULE_TARGET = "mqa_lm.training.datamodule.TextDataModule"


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


store("model", "_base", model_base())
for _name in OPTIMIZERS:
    store("optim", f"_{_name}_base", optim_base(_name))
store("data", "_base", data_base())
register("generation", "harness")  # train.yaml's sample, callbacks.lm_eval
