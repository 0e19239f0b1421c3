"""Imports one way (kernels -> nn -> model -> inference and model files -> training): the import-linter
contracts in pyproject.toml, and what a process that only generates actually imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import CORPUS, ROOT, repo_env, run_env, tiny_run

TRAINING_STACK = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is installed with the [dev] extra")
    # lint-imports' own entry point, run by this interpreter (wherever its scripts directory is).
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=repo_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real train.py run (a few steps of a tiny model): a run directory with model/ and last.ckpt."""
    tmp = tmp_path_factory.mktemp("layering")
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    overrides = tiny_run(tmp / "cache") + [
        f"data.paths=[{corpus}]",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "sample.max_new_tokens=0",
        f"hydra.run.dir={tmp / 'run'}",
        "callbacks=[model_checkpoint,pretrained_export]",
    ]
    done = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


def test_loading_and_generating_import_no_training_stack(run_dir):
    code = f"""
import sys, torch
import mqa_lm
from mqa_lm import generate, load_pretrained
for source in ({str(run_dir)!r}, {str(run_dir / "checkpoints" / "last.ckpt")!r}):
    model, tokenizer = load_pretrained(source, require_tokenizer=True)
    out = generate(model, torch.tensor([tokenizer.encode("Fi").ids]), 5, temperature=0.0)
    assert out.shape == (1, 7), out.shape
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({TRAINING_STACK!r}))
print("training stack:", loaded)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training stack: []" in done.stdout


def test_generate_py_imports_no_training_stack(run_dir):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "generate.py", f"ckpt_path={run_dir}", "prompt=Fi", "max_new_tokens=3"],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert imported & set(TRAINING_STACK) == set()
    assert "tokens" in done.stderr  # it did generate
    loaded = _package_modules(done.stderr)
    assert [m for m in loaded if m.startswith(NOT_FOR_GENERATION)] == []
    # On a GPU the engine also imports the Triton decode kernels it runs there (and only those).
    device_kernels = {m for m in loaded if m == "mqa_lm.kernels.triton" or m.startswith("mqa_lm.kernels.triton.")}
    expected = {"mqa_lm.kernels.triton", "mqa_lm.kernels.triton.decode", "mqa_lm.kernels.triton.decode_linear"}
    assert device_kernels <= expected, sorted(device_kernels)
    assert len(loaded - device_kernels) == GENERATE_PY_MODULES, sorted(loaded)


# How many of the package's modules each entry point loads, pinned: a new import on these paths is a
# decision the diff shows (change the number and say why), not a slow creep of start-up time.
ENTRY_POINT_MODULES = {
    "import mqa_lm": 3,  # the package, utils and its lazy-export helper: torch is not imported yet
    "from mqa_lm import MultiQueryAttention": 16,
    "from mqa_lm import generate, load_pretrained": 30,  # 29 + inference.warmup, which the engine joins
}
# The above, the cli helpers, the engine, the pretrained package and utils.triton_prepare (Triton's
# start-up on a thread before torch's import); inference.warmup (the device's first work on a thread).
GENERATE_PY_MODULES = 40
# Generation needs the model, the engine and the model files; none of these.
NOT_FOR_GENERATION = ("mqa_lm.training", "mqa_lm.optim", "mqa_lm.data.prepare", "mqa_lm.evaluation", "mqa_lm.export")


def _package_modules(importtime_stderr: str) -> set[str]:
    names = {line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if "|" in line}
    return {name for name in names if name == "mqa_lm" or name.startswith("mqa_lm.")}


@pytest.mark.parametrize("code", sorted(ENTRY_POINT_MODULES))
def test_entry_points_load_the_pinned_package_modules(code):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = _package_modules(done.stderr)
    assert len(loaded) == ENTRY_POINT_MODULES[code], sorted(loaded)


@pytest.mark.parametrize(
    "override,line",
    [
        ("optim.lr=1e-3x", "config error: optim.lr must be a number, got '1e-3x'"),
        ("model.d_model=-1", "config error: model.d_model must be an integer >= 1, got -1"),
        ("trainer.precision=17", "config error: trainer.precision=17 is not one of auto"),
    ],
)
def test_train_py_answers_a_bad_value_before_importing_lightning(tmp_path, override, line):
    """A bad value is one line before Lightning's import (seconds), and the run directory Hydra made
    for it is gone."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", override, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    messages = [m for m in done.stderr.splitlines() if not m.startswith("import time:")]
    assert len(messages) == 1 and messages[0].startswith(line), messages
    imported = {m.rsplit("|", 1)[-1].strip().split(".")[0] for m in done.stderr.splitlines() if "|" in m}
    assert imported & set(TRAINING_STACK) == set()
    assert not run_dir.exists()
