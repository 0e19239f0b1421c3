"""A Rich progress bar that shows the loss and the tokens/s of :class:`TokenThroughputMonitor`."""

from __future__ import annotations

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
