"""Validation lines where no progress bar shows them, early stopping as a callbacks option, the step
counter of the bar, the one-line model summary and a default run's output without known noise."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
from helpers import CORPUS, ROOT, compose_cfg
from test_training import corpus, small_run  # noqa: F401  (corpus is a fixture)

from mqa_lm.training.run import train


def _val_losses(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}


def test_each_validation_prints_one_line_with_the_logged_loss(tmp_path, corpus, capsys):  # noqa: F811
    cfg = compose_cfg(
        small_run(tmp_path, corpus, "trainer.max_steps=12", "trainer.val_check_interval=4", "sample.max_new_tokens=0")
    )
    train(cfg)
    lines = re.findall(r"^step (\d+): val/loss ([\d.]+) \(([\d.]+) s\)$", capsys.readouterr().out, re.M)
    assert [int(step) for step, _, _ in lines] == [4, 8, 12]
    logged = _val_losses(tmp_path / "run")
    for step, loss, _ in lines:
        # The CSV logs validation at the step index of the batch before it (Lightning's convention).
        assert any(abs(float(loss) - v) < 1e-4 for v in logged.values()), (step, loss, logged)
    times = [float(t) for _, _, t in lines]
    assert times == sorted(times)


def test_the_report_names_the_command_that_samples_from_the_run(tmp_path, corpus, capsys):  # noqa: F811
    cfg = compose_cfg(small_run(tmp_path, corpus, "trainer.max_steps=2", "sample.max_new_tokens=0"))
    train(cfg)
    out = capsys.readouterr().out
    assert f"sample more: python generate.py ckpt_path={tmp_path / 'run'} prompt=" in out


def test_early_stopping_ends_the_run_before_max_steps(tmp_path, corpus, capsys):  # noqa: F811
    # min_delta larger than any possible improvement: the first validation sets the best, the
    # next `patience` ones cannot beat it, and training stops there.
    cfg = compose_cfg(
        small_run(
            tmp_path,
            corpus,
            "callbacks=[default,early_stopping]",
            "trainer.max_steps=40",
            "trainer.val_check_interval=4",
            "callbacks.early_stopping.patience=2",
            "callbacks.early_stopping.min_delta=100",
            "sample.max_new_tokens=0",
        )
    )
    train(cfg)
    steps = [int(s) for s in re.findall(r"^step (\d+): val/loss", capsys.readouterr().out, re.M)]
    assert steps == [4, 8, 12]


def test_train_py_output_is_free_of_known_noise(tmp_path, corpus):  # noqa: F811
    """The entry point as a user runs it (bar and summary on, output to a file): no litlogger advert,
    no LeafSpec deprecation, no `Total FLOPs: 0`, no `Epoch 0/-2`; our summary line instead."""
    from lightning.pytorch.utilities.model_summary import get_human_readable_count

    from mqa_lm import MQAConfig, MQATransformer

    overrides = [
        o
        for o in small_run(tmp_path, corpus, "trainer.max_steps=4", "trainer.val_check_interval=4")
        if not o.startswith(("paths.output_dir", "trainer.enable_"))
    ]
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for noise in ("litlogger", "LeafSpec", "Total FLOPs", "Epoch 0/-2", "Skipping setting a default"):
        assert noise not in out, noise
    model = MQATransformer(MQAConfig(vocab_size=len(set(CORPUS)) + 2, max_seq_len=16, n_layers=2, d_model=32, heads=4))
    params = get_human_readable_count(model.num_params())
    flops = get_human_readable_count(int(model.flops_per_token()))
    line = (
        f"model: MQATransformer, {params} parameters ({params} trainable), {flops} FLOPs per token to train "
        "at sequence length 16"
    )
    assert line in proc.stdout.splitlines(), proc.stdout[-3000:]
    assert "step 4: val/loss" in proc.stdout  # the validation line stays


def fit_with_bar(tmp_path: Path, text_file: Path, bar_class: type | None = None, **trainer_args) -> str:
    """A one-layer model trained on the CPU under ``bar_class`` (TokensPerSecondBar) on a terminal of
    160 columns, 2 micro-batches a step; returns what the bar drew, escape codes removed."""
    from mqa_lm.model import MQAConfig
    from mqa_lm.training import TextDataModule
    from mqa_lm.training.callbacks import TokensPerSecondBar
    from mqa_lm.training.module import MQALitModule

    screen = io.StringIO()
    bar = (bar_class or TokensPerSecondBar)(console_kwargs={"file": screen, "force_terminal": True, "width": 160})
    dm = TextDataModule(str(text_file), tokenizer="char", block_size=16, batch_size=4, cache_dir=str(tmp_path / "c"))
    module = MQALitModule(MQAConfig(vocab_size=64, n_layers=1, d_model=32, heads=4, max_seq_len=16))
    trainer = L.Trainer(
        accelerator="cpu",
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[bar],
        default_root_dir=tmp_path,
        **trainer_args,
    )
    trainer.fit(module, datamodule=dm)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())


def test_progress_bar_counts_optimizer_steps_to_max_steps(tmp_path, corpus):  # noqa: F811
    text = fit_with_bar(tmp_path, corpus, max_steps=6)
    assert "step" in text and "6/6" in text, text[-2000:]
    assert "Epoch" not in text and "12/12" not in text  # not epochs, not micro-batches


def test_progress_bar_reads_the_metrics_only_when_it_refreshes(tmp_path, corpus):  # noqa: F811
    """Reading the bar's metrics is a host sync on a GPU (the logged loss's ``.item()``): once per
    ``log_every_n_steps`` optimizer steps, not after every micro-batch as Lightning's bar does."""
    from mqa_lm.training.callbacks import TokensPerSecondBar

    reads: list[int] = []

    class CountingBar(TokensPerSecondBar):
        def get_metrics(self, trainer, pl_module):
            reads.append(trainer.global_step)
            return super().get_metrics(trainer, pl_module)

    text = fit_with_bar(tmp_path, corpus, CountingBar, max_steps=12, log_every_n_steps=4)
    # Steps 4, 8 and 12 (24 micro-batches), then once more at the end of the epoch.
    assert [s for s in reads if s < 12] == [4, 8], reads
    assert len(reads) <= 4, reads
    assert "12/12" in text and "train/loss" in text, text[-2000:]
