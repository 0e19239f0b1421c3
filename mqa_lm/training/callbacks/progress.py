"""A Rich progress bar that shows optimizer steps, the loss and the tokens/s of
:class:`TokenThroughputMonitor`; a plain validation line where no bar is seen; and a one-line model
summary (parameters and training FLOPs per token) in place of Lightning's table."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from mqa_lm.training.callbacks.throughput import TokenThroughputMonitor
from mqa_lm.utils.config import check_int


class TokensPerSecondBar(RichProgressBar):
    """Lightning's RichProgressBar plus ``tok/s`` (updated every ``log_every_n_steps`` steps).

    With ``trainer.max_steps`` set, the training bar counts optimizer steps to it (``step 120/800``)
    rather than batches of an epoch (an epoch here is the whole run, and ``max_epochs`` is -1).

    The loss and the rest are read every ``trainer.log_every_n_steps`` steps (when the loggers log
    them) and at the last, the position every step. ``train/loss`` is logged without ``prog_bar``
    (Lightning would turn it into a float after every micro-batch, a host sync that idles the GPU
    while the next step is launched), so the bar takes it from ``trainer.callback_metrics`` here,
    on the steps when the loggers read it anyway.
    """

    _metrics_read_at: int | None = None

    def _counts_steps(self) -> bool:
        return self._trainer is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "step" if self._counts_steps() else f"epoch {current_epoch}"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-run
        current = trainer.global_step if self._counts_steps() else batch_idx + 1
        self._update(self.train_progress_bar_id, current)
        every = max(1, trainer.log_every_n_steps)  # type: ignore[attr-defined]  # set in Trainer.__init__, not declared
        due = current > 0 and (current % every == 0 or current >= self.total_train_batches)
        # Once per such step: with accumulation, global_step repeats over its micro-batches.
        if due and current != self._metrics_read_at:
            self._metrics_read_at = current
            self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            items["train/loss"] = float(loss)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # Trainer.callbacks is set in __init__
            if isinstance(callback, TokenThroughputMonitor):
                rate = callback.last_metrics.get("throughput/tokens_per_sec")
                if rate is not None:
                    items["tok/s"] = f"{rate:,.0f}"
        return items


def progress_bar(enabled: bool = True, refresh_rate: int = 1, leave: bool = False) -> TokensPerSecondBar | None:
    """The bar, or None when ``trainer.enable_progress_bar`` is false (Lightning refuses a progress
    bar callback then; ``build_callbacks`` drops the None)."""
    check_int(refresh_rate, "callbacks.progress_bar.refresh_rate", minimum=0)
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


class ModelSizeSummary(ModelSummary):
    """One line at the start of fit in place of Lightning's table, whose FLOPs column reads 0 without
    an example input: ``model: MQATransformer, 6.9 M parameters (6.9 M trainable), 41.2 M FLOPs per
    token to train at sequence length 256``. The FLOPs are ``MQATransformer.flops_per_token``
    (forward + backward; a third of it is the forward)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        summary = self._summary(trainer, pl_module)
        model = getattr(pl_module, "model", None)
        name = type(model).__name__ if model is not None else type(pl_module).__name__
        line = (
            f"model: {name}, {get_human_readable_count(summary.total_parameters)} parameters "
            f"({get_human_readable_count(summary.trainable_parameters)} trainable)"
        )
        flops = getattr(model, "flops_per_token", None)
        if model is not None and callable(flops):
            seq = model.config.max_seq_len
            line += f", {get_human_readable_count(int(flops()))} FLOPs per token to train at sequence length {seq}"
        print(line, flush=True)


def model_summary(enabled: bool = True) -> ModelSizeSummary | None:
    """The summary, or None when ``trainer.enable_model_summary`` is false (``build_callbacks`` drops it)."""
    return ModelSizeSummary() if enabled else None
