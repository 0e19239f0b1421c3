"""Training with Lightning: everything ``python train.py`` runs, and the only package that imports
Lightning.

* :mod:`~mqa_lm.training.config`: every config group validated into one
  :class:`~mqa_lm.training.config.RunConfig`, without Lightning (train.py runs it first);
* :mod:`~mqa_lm.training.run`: :func:`train` (prepare data, build the Trainer, fit, report);
* :mod:`~mqa_lm.training.module`: :class:`MQALitModule`, the LightningModule (loss, optimizer,
  schedule, compile); :mod:`~mqa_lm.training.datamodule`: :class:`TextDataModule`;
* :mod:`~mqa_lm.training.config_store`: the ``model``/``optim``/``data`` base nodes generated from
  their dataclasses; :mod:`~mqa_lm.training.init_from`: ``init_from=`` a pretrained model;
* :mod:`~mqa_lm.training.distributed`: launch checks, the global batch, ``trainer=fsdp`` (FSDP2);
* :mod:`~mqa_lm.training.run_dir`: run directories and their lock; :mod:`~mqa_lm.training.loggers`:
  the resumable CSV logger; :mod:`~mqa_lm.training.console`: third-party noise silenced;
* :mod:`~mqa_lm.training.callbacks` (observability, exports, progress, lm-eval) and
  :mod:`~mqa_lm.training.checkpointing` (atomic writes, resume, RNG state, preemption).

May import every layer below (model, optimizer, data, generation, model files, evaluation, cli);
nothing below imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqa_lm.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from mqa_lm.training.config import ConfigError, DataError
    from mqa_lm.training.datamodule import TextDataModule
    from mqa_lm.training.module import MQALitModule
    from mqa_lm.training.run import train

_EXPORTS = {
    "ConfigError": "mqa_lm.training.config",
    "DataError": "mqa_lm.training.config",
    "train": "mqa_lm.training.run",
    "MQALitModule": "mqa_lm.training.module",
    "TextDataModule": "mqa_lm.training.datamodule",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "ConfigError",
    "DataError",
    "MQALitModule",
    "TextDataModule",
    "train",
]
