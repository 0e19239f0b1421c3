"""A Rich progress bar that shows the loss and the tokens/s of :class:`TokenThroughputMonitor`, and a
plain validation line where no bar is seen."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from mqa_lm.callbacks.throughput import TokenThroughputMonitor


class TokensPerSecondBar(RichProgressBar):
    """Lightning's RichProgressBar plus ``tok/s`` (updated every ``log_every_n_steps`` steps)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        for callback in trainer.callbacks:
            if isinstance(callback, TokenThroughputMonitor):
                rate = callback.last_metrics.get("throughput/tokens_per_sec")
                if rate is not None:
                    items["tok/s"] = f"{rate:,.0f}"
        return items


def progress_bar(enabled: bool = True, refresh_rate: int = 1, leave: bool = False) -> TokensPerSecondBar | None:
    """The bar, or None when ``trainer.enable_progress_bar`` is false (Lightning refuses a progress
    bar callback then; ``build_callbacks`` drops the None)."""
    if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
        raise ValueError(f"callbacks.progress_bar.refresh_rate must be an integer >= 0, got {refresh_rate!r}")
    return TokensPerSecondBar(refresh_rate=refresh_rate, leave=leave) if enabled else None


class ValidationLine(L.Callback):
    """One line per validation, ``step 500: val/loss 1.4790 (52.3 s)``, where no progress bar shows
    it: when the bar is off or the output is not a terminal (a log file, a SLURM job, CI).

    The time is wall-clock seconds since training started, so two runs can be compared on time to
    a given loss. ``always=True`` prints even beside a live progress bar.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always
        self._start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._start is None:
            return
        bar_visible = trainer.progress_bar_callback is not None and sys.stdout.isatty()
        if bar_visible and not self.always:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None:
            return
        elapsed = time.perf_counter() - self._start
        print(f"step {trainer.global_step}: val/loss {float(loss):.4f} ({elapsed:.1f} s)", flush=True)
