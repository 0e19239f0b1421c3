"""Keeps a run self-contained: ``<run>/tokenizer.json`` and ``<run>/model/``, the best model so far
as ``model.safetensors`` + ``config.json`` + ``tokenizer.json`` (see :mod:`mqa_lm.pretrained.directory`)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch

from mqa_lm.pretrained.directory import (
    MODEL_FILE,
    check_export_target,
    write_export,
    write_tokenizer,
)
from mqa_lm.training.module import datamodule_tokenizer, trained_model


class PretrainedExport(L.Callback):
    """Writes the run's tokenizer at fit start and exports the model whenever ``monitor`` improves.

    The export is rewritten only when the validation score beats the best so far (strictly, as
    ``ModelCheckpoint`` decides), so ``<run>/model/`` holds the same weights as the best checkpoint.
    A run that never validates is exported once at the end. Only rank zero writes; under a sharded
    strategy (``trainer=fsdp``, or Lightning's FSDPStrategy) every rank takes part in gathering the
    full weights first. The best score is part of the checkpoint, so a resumed run does not replace
    a better export with a worse one.

    Args:
        dirpath: the export directory (``<run>/model``).
        tokenizer_file: where the run's ``tokenizer.json`` goes at fit start (None: not written).
        monitor, mode: the metric that decides "best", as in ``ModelCheckpoint``.
    """

    def __init__(
        self, dirpath: str, tokenizer_file: str | None = None, monitor: str = "val/loss", mode: str = "min"
    ) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"callbacks.pretrained_export.mode must be 'min' or 'max', got {mode!r}")
        self.dirpath = Path(dirpath)
        self.tokenizer_file = Path(tokenizer_file) if tokenizer_file else None
        self.monitor = monitor
        self.mode = mode
        self.best_score: float | None = None
        self._sharded_warned = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # Before any training: a run directory that already exports another model stops here.
        check_export_target(self.dirpath, trained_model(pl_module).config)
        tokenizer = datamodule_tokenizer(trainer)
        if tokenizer is not None and self.tokenizer_file is not None:
            write_tokenizer(self.tokenizer_file, tokenizer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            return
        score = float(metric)
        if not is_better(score, self.best_score, self.mode):
            return
        self.best_score = score
        self.export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_score is None and not getattr(trainer, "fast_dev_run", False):
            self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Write the module's current weights to :attr:`dirpath` (rank zero); all ranks must call it."""
        state = self._full_state(trainer, pl_module)
        if state is None or not trainer.is_global_zero:
            return None
        return write_export(self.dirpath, trained_model(pl_module).config, state, datamodule_tokenizer(trainer))

    def _full_state(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor] | None:
        from lightning.pytorch.strategies import FSDPStrategy

        from mqa_lm.training.callbacks.attention import is_sharded
        from mqa_lm.training.distributed import full_model_state, is_fully_sharded

        if not is_sharded(trainer):
            return trained_model(pl_module).state_dict() if trainer.is_global_zero else None
        if is_fully_sharded(trained_model(pl_module)):  # trainer=fsdp (FSDP2): every rank gathers, rank 0 gets it
            return full_model_state(trained_model(pl_module))
        if isinstance(trainer.strategy, FSDPStrategy):
            from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

            # The FSDP-wrapped module, set by the strategy once fitting started.
            wrapped = cast(torch.nn.Module, trainer.strategy.model)
            # A collective: every rank gathers, rank zero receives the full weights on the CPU.
            # Lightning annotates this context manager as a bare Generator, hence the ignore.
            with _get_full_state_dict_context(wrapped, world_size=trainer.world_size):  # type: ignore[attr-defined]
                full = wrapped.state_dict()
            if not trainer.is_global_zero:
                return None
            return {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}
        if not self._sharded_warned:
            self._sharded_warned = True
            warnings.warn(
                f"{type(self).__name__}: {type(trainer.strategy).__name__} shards the weights and is not supported; "
                f"no {self.dirpath / MODEL_FILE} is written (load the run's checkpoint instead)",
                stacklevel=2,
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "monitor": self.monitor, "mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") == self.monitor and state_dict.get("mode") == self.mode:
            self.best_score = state_dict.get("best_score")


def is_better(score: float, best: float | None, mode: str) -> bool:
    """Whether ``score`` strictly improves on ``best`` (as ModelCheckpoint decides)."""
    if not math.isfinite(score):
        return False
    if best is None:
        return True
    return score < best if mode == "min" else score > best
