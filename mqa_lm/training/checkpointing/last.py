"""``last.ckpt`` that always holds the newest weights of the run, written once per step."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from mqa_lm.pretrained.checkpoint import fsync_directory
from mqa_lm.training.checkpointing.io import AtomicCheckpointIO


def link_checkpoint(source: str | Path, target: str | Path) -> bool:
    """Make ``target`` a hard link to the checkpoint file ``source``, atomically: readers of ``target``
    see its old file or ``source``'s, never a missing or partial one. False, with nothing changed,
    where that cannot be done (a directory, a remote path, a file system without hard links, another
    device): the caller then writes the checkpoint in full."""
    source, target = str(source), str(target)
    if "://" in source or "://" in target or not os.path.isfile(source) or os.path.isdir(target):
        return False
    directory = os.path.dirname(target) or "."
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        # rename() between two names of one file does nothing and would leave tmp behind.
        if os.path.exists(target) and os.path.samefile(source, target):
            os.unlink(tmp)
            return True
        os.replace(tmp, target)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False
    fsync_directory(directory)
    return True


class LastAndBestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the best ``save_top_k`` by ``monitor``, plus ``last.ckpt``) whose
    ``last.ckpt`` is rewritten at every validation and at the end of training, and is never written
    twice for one step.

    * Lightning 2.6 rewrites ``last.ckpt`` only at a step where a top-k checkpoint was saved too, so
      after a validation that does not improve the monitored metric, and at the end of a run whose
      last step had no validation, ``last.ckpt`` silently held older weights: continuing a run from it
      (``ckpt_path=.../last.ckpt``) restarted from an earlier step. Here it is written then too.
    * At a step where the top-k checkpoint was just written, ``last.ckpt`` becomes a hard link to that
      file instead of a second full write of the same state (model, optimizer, loops): each improving
      validation writes the run's state once, not twice. The two files hold the same bytes because
      ``last_model_path``, the one field of this callback's saved state that the second write would
      change, is set before the first. When the top-k file is later replaced by a better one,
      ``last.ckpt`` keeps its own link to the data until it is itself rewritten. Where no hard link
      can be made (no support in the file system, a remote or sharded checkpoint), ``last.ckpt`` is
      written in full as before, and so it is with a checkpoint writer other than
      :class:`~mqa_lm.training.checkpointing.io.AtomicCheckpointIO` (one that truncates a file in
      place would overwrite the best checkpoint through ``last.ckpt``); every rank follows rank
      zero's outcome, so collective saves stay in step. (Since the two names share one file, a
      checkpoint edited in place, rather than written to a new name, changes both.)
    """

    _saved_last_model_path: str | None = None  # last_model_path inside the file this callback wrote last

    def _last_path(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> str:
        """The path Lightning's ``_save_last_checkpoint`` is about to write (its version counter
        included), so that the top-k checkpoint can already carry it as ``last_model_path``."""
        filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        if self._enable_version_counter:
            version = self.STARTING_VERSION
            while self.file_exists(filepath, trainer) and filepath != self.last_model_path:
                filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST, ver=version)
                version += 1
        return filepath

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.save_last is True and self.save_top_k != 0:
            self.last_model_path = self._last_path(trainer, monitor_candidates)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        source = self._last_checkpoint_saved
        same_state = (
            filepath == self.last_model_path
            and self._last_global_step_saved == trainer.global_step
            and bool(source)
            and source != filepath
            and self._saved_last_model_path == filepath  # what the file says last.ckpt is
            # A writer that may rewrite a file in place (a user's plugin; Lightning's own where fsspec's
            # temp dir is on another file system) would carry last.ckpt's next write into the best file.
            and isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
        )
        if not same_state:
            self._saved_last_model_path = self.last_model_path
            super()._save_checkpoint(trainer, filepath)
            return
        linked = link_checkpoint(source, filepath) if trainer.is_global_zero else False
        if not trainer.strategy.broadcast(linked, src=0):
            super()._save_checkpoint(trainer, filepath)
            return
        trainer.strategy.barrier("LastAndBestCheckpoint.link")
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

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
