"""Validation lines where no progress bar shows them, and early stopping as a callbacks option."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from test_training import compose_cfg, corpus, small_run  # noqa: F401  (corpus is a fixture)

from mqa_lm.training import train


def _val_losses(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}


def test_each_validation_prints_one_line_with_the_logged_loss(tmp_path, corpus, capsys):  # noqa: F811
    cfg = compose_cfg(small_run(tmp_path, corpus, "trainer.max_steps=12", "trainer.val_check_interval=4",
                                "sample.max_new_tokens=0"))
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
    cfg = compose_cfg(small_run(tmp_path, corpus, "callbacks=[default,early_stopping]", "trainer.max_steps=40",
                                "trainer.val_check_interval=4", "callbacks.early_stopping.patience=2",
                                "callbacks.early_stopping.min_delta=100", "sample.max_new_tokens=0"))
    train(cfg)
    steps = [int(s) for s in re.findall(r"^step (\d+): val/loss", capsys.readouterr().out, re.M)]
    assert steps == [4, 8, 12]
