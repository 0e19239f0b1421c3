"""``last.ckpt`` that always holds the newest weights of the run."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastAndBestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the best ``save_top_k`` by ``monitor``, plus ``last.ckpt``) whose
    ``last.ckpt`` is rewritten at every validation and at the end of training.

    Lightning 2.6 rewrites ``last.ckpt`` only at a step where a top-k checkpoint was saved too, so
    after a validation that does not improve the monitored metric, and at the end of a run whose last
    step had no validation, ``last.ckpt`` silently held older weights: continuing a run from it
    (``ckpt_path=.../last.ckpt``) restarted from an earlier step. (Lightning's own ``_save_last_checkpoint``
    is used, so ``last.ckpt`` is written exactly as before, only when it would have been skipped.)
    """

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        if not self.save_last or trainer.global_step == 0 or self._should_skip_saving_checkpoint(trainer):
            return  # the check also covers a step already saved (by this callback) and sanity checks
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)
