"""Loggers that keep what a run already wrote when it continues in the same directory."""

from __future__ import annotations

import csv

import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricExperimentWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when its directory is reused; a
    resumed run (``ckpt_path=...``, ``resume=auto``) reuses it on purpose, so this one keeps the
    file, takes its header as the known columns and appends. Rows of steps at or after
    ``drop_from`` (the resumed checkpoint's step) are dropped first: the resumed run logs those
    steps again, and a killed attempt's rows of them describe weights no checkpoint holds."""

    def __init__(self, log_dir: str, drop_from: int | None = None) -> None:
        self._drop_from = drop_from
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.reader(file)
            header = next(reader, [])
            rows = list(reader)
        self.metrics_keys = sorted(header)
        if self._drop_from is None or "step" not in header:
            return
        at = header.index("step")
        kept = [r for r in rows if not (len(r) > at and r[at].strip() and int(float(r[at])) >= self._drop_from)]
        if len(kept) == len(rows):
            return
        tmp = f"{self.metrics_file_path}.tmp"
        with self._fs.open(tmp, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(header)
            writer.writerows(kept)
        self._fs.mv(tmp, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run directory's ``metrics.csv`` instead of deleting it."""

    _drop_from: int | None = None

    def resume_from_step(self, step: int) -> None:
        """The run continues from a checkpoint of ``step``: rows of that step and later are dropped
        from ``metrics.csv`` before anything is appended (call before the first log)."""
        if self._experiment is not None:
            raise RuntimeError("resume_from_step must be called before the logger writes")
        self._drop_from = int(step)

    def log_metrics(self, metrics: dict[str, torch.Tensor | float], step: int | None = None) -> None:  # type: ignore[override]  # as CSVLogger
        super().log_metrics(metrics, step)
        # Written through rather than buffered until Lightning's next flush (every 100 steps): a run
        # killed after a checkpoint lost the rows logged since the last flush, and its continuation
        # from that checkpoint does not log those steps again.
        self.save()

    @property
    def experiment(self) -> _FabricExperimentWriter:
        if self._experiment is None:
            self._experiment = _AppendingWriter(log_dir=self.log_dir, drop_from=self._drop_from)
        return self._experiment
