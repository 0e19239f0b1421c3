"""train.py's training step on a GPU makes the host wait for the device only on logging steps: a
wait elsewhere idles the GPU while the host launches the next step (skipped without CUDA).

Run on the device: python -m pytest -q tests/test_training_gpu.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import compose_cfg, tiny_run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GUARDED = range(3, 10)  # micro-batches after the compiled first step, before the run's last


class NoHostSyncs(L.Callback):
    """CUDA's sync debug mode set to ``error`` from the start of micro-batch ``GUARDED[0]`` to the
    start of the one after ``GUARDED[-1]``: every hook, Lightning's own end-of-batch work and the next
    batch's transfer in between raise on a host-device synchronisation."""

    guarded: list[int] = []  # class-wide: train() builds its own instance from the config

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == GUARDED[0]:
            torch.cuda.set_sync_debug_mode("error")
        elif batch_idx == GUARDED[-1] + 1:
            torch.cuda.set_sync_debug_mode("default")
        if batch_idx in GUARDED:
            NoHostSyncs.guarded.append(batch_idx)


@pytest.mark.parametrize("optim,accumulate", [("muon", 1), ("adamw", 2)])
def test_no_host_sync_between_logging_steps(tmp_path: Path, optim: str, accumulate: int) -> None:
    from mqa_lm.training.run import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 400, encoding="utf-8")
    NoHostSyncs.guarded = []
    cfg = compose_cfg(
        [
            "data=text",
            f"data.paths=[{corpus}]",
            *tiny_run(tmp_path / "cache", d_model=64, trainer="gpu"),
            f"paths.output_dir={tmp_path / 'run'}",
            f"optim={optim}",
            f"trainer.accumulate_grad_batches={accumulate}",
            "trainer.max_steps=12",
            # No logging step and no validation among the guarded micro-batches: the default callbacks
            # (checkpoints, samples, throughput, gradient norm, RNG state, preemption) stay on.
            "trainer.log_every_n_steps=50",
            "trainer.val_check_interval=12",
            "trainer.limit_val_batches=1",
            "sample.max_new_tokens=4",
            # pytest imports this file as a top-level module, so Hydra finds the class by that name
            f"+callbacks.no_host_syncs._target_={__name__}.NoHostSyncs",
        ]
    )
    try:
        metrics = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert NoHostSyncs.guarded == list(GUARDED)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
