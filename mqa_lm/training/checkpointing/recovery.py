"""Recovery checkpoints: ``recovery-stepN.ckpt`` every N optimizer steps, the ``save_top_k`` newest kept."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RecoveryCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (``monitor: step``, ``mode: max``) whose rotation also covers the
    files of earlier attempts of the run.

    Lightning never deletes the checkpoint the trainer resumed from, and after a resume it does not
    know the recovery files an interrupted attempt wrote (a resumed run writes ``-v1`` beside them);
    each stayed for good, as large as the model and optimizer state. After every save here, files of
    this callback's name pattern in its own ``dirpath`` that it does not track and that are not newer
    than the step just saved are deleted, so ``save_top_k`` files remain. Other directories are never touched.
    """

    def _pattern(self) -> re.Pattern[str]:
        template = self.filename or "{epoch}-{step}"
        parts = re.split(r"\{[^}]*\}", template)
        body = r"\d+".join(re.escape(p) for p in parts)
        return re.compile(rf"^{body}(?:{re.escape(self.CHECKPOINT_JOIN_CHAR)}v\d+)?{re.escape(self.FILE_EXTENSION)}$")

    def _update_best_and_save(self, current: Any, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        if self.dirpath is None or "://" in str(self.dirpath) or self.save_top_k < 1 or not trainer.is_global_zero:
            return
        directory = Path(self.dirpath)
        tracked = {Path(p).absolute() for p in self.best_k_models}
        step = int(monitor_candidates.get("step", trainer.global_step))
        pattern = self._pattern()
        for path in directory.iterdir():
            if path.absolute() in tracked or not pattern.match(path.name):
                continue
            found = re.search(r"step(\d+)", path.name)
            if found is not None and int(found.group(1)) <= step:
                trainer.strategy.remove_checkpoint(str(path))
