"""Benchmarks during training: lm-evaluation-harness tasks on the live model every N steps.

``callbacks=[default,lm_eval] callbacks.lm_eval.tasks=[hellaswag] callbacks.lm_eval.every_n_steps=1000``
(configs/callbacks/lm_eval.yaml; needs the ``[eval]`` extra). Rank 0 evaluates while the other
ranks wait at a barrier; the metrics go to every logger as ``eval/<task>/<metric>`` at that step.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch

from mqa_lm.evaluation import tasks as harness_tasks
from mqa_lm.evaluation.scoring import BATCH_SIZE
from mqa_lm.training.callbacks.attention import is_sharded
from mqa_lm.training.module import datamodule_tokenizer, trained_model
from mqa_lm.utils.config import check_int

KEY = "callbacks.lm_eval"


class LMEvalCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, run lm-eval ``tasks`` on the model being trained.

    The model runs in eval mode under the trainer's precision (its autocast, or its dtype for the
    ``-true`` precisions), then goes back to the mode it was in; the Python, NumPy and torch random
    states are restored afterwards, so a run with this callback trains exactly as one without.
    The tasks (and their datasets) are loaded once, before training starts.

    Args:
        tasks: harness task names (or globs, or YAML paths), e.g. ``[hellaswag, arc_easy]``.
        every_n_steps: optimizer steps between two evaluations.
        limit: examples per task: an integer, a fraction in (0, 1), or null for all.
        num_fewshot: few-shot examples, or null for each task's default.
        batch_size: rows per forward.
        include_path: a directory (or list) of task YAMLs of your own.
    """

    def __init__(
        self,
        tasks: list[str],
        every_n_steps: int = 1000,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = BATCH_SIZE,
        include_path: str | list[str] | None = None,
    ) -> None:
        super().__init__()
        self.options = harness_tasks.HarnessOptions(tasks, include_path, num_fewshot, limit, batch_size).checked(
            f"{KEY}."
        )
        self.every_n_steps = check_int(every_n_steps, f"{KEY}.every_n_steps")
        harness_tasks.require_harness(KEY)
        self.names, self._manager = harness_tasks.find_tasks(
            self.options.tasks, self.options.include_path, f"{KEY}.tasks"
        )
        self._tasks: list[Any] = []
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if is_sharded(trainer):
            raise ValueError(
                f"{KEY} cannot run under {type(trainer.strategy).__name__}: rank 0 alone cannot run a sharded "
                "model; remove lm_eval from callbacks and evaluate the run's model/ export with eval.py"
            )
        if trainer.is_global_zero and not self._tasks:
            self._tasks = harness_tasks.load_tasks(self.names, self._manager, f"{KEY}.tasks")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            if trainer.is_global_zero:
                self.evaluate(trainer, pl_module)
            trainer.strategy.barrier("lm_eval")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run the tasks on rank 0's model; log and return ``{"eval/<task>/<metric>": value}``."""
        from mqa_lm.evaluation.harness import MQALM

        tokenizer = datamodule_tokenizer(trainer)
        if tokenizer is None:
            raise RuntimeError(f"{KEY} needs the datamodule's tokenizer (a TextDataModule) to encode the tasks")
        model = trained_model(pl_module)
        was_training = model.training
        start = time.perf_counter()
        model.eval()
        try:
            with _random_state_kept(), _quiet_harness(), torch.no_grad(), trainer.precision_plugin.forward_context():
                lm = MQALM(model, tokenizer, batch_size=self.options.batch_size, progress=False)
                results = harness_tasks.run_tasks(
                    lm,
                    self._tasks,
                    self._manager,
                    num_fewshot=self.options.num_fewshot,
                    limit=self.options.limit,
                    bootstrap_iters=0,  # no standard errors: they are not logged
                )
        finally:
            model.train(was_training)
        metrics = harness_tasks.metrics(results)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        shown = ", ".join(f"{name.removeprefix('eval/')} {value:.4f}" for name, value in metrics.items())
        print(f"lm_eval at step {step}: {shown} ({time.perf_counter() - start:.1f} s)", flush=True)
        return metrics


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) random states on exit: the harness seeds
    all three, and training must not see the difference."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness's INFO lines (seeds, task selection) at every evaluation would bury the training
    log; its warnings still show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
