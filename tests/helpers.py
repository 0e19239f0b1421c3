"""What several test modules share: the reference corpus, config composition, tiny-run overrides and
the environment of child processes (train.py runs, the Triton interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from mqa_lm.training import config_store  # noqa: F401  (the _base nodes Hydra composes, as train.py registers them)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 40
# Set by a launcher (SLURM, torchrun, a DDP parent); a child run that inherits them believes it is one
# rank of a job that does not exist.
LAUNCHER_VARS = ("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC", "GROUP_RANK")


def compose_cfg(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """configs/train.yaml composed with ``overrides``, as train.py would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


def tiny_run(cache_dir: Path, *, n_layers: int = 2, d_model: int = 32, trainer: str = "cpu") -> list[str]:
    """Overrides for a seconds-long run of a tiny model on a character corpus (the caller names the
    corpus and what the run does)."""
    return [
        "data.tokenizer=char",
        "data.block_size=16",
        "data.batch_size=4",
        "data.val_batches=2",
        f"data.cache_dir={cache_dir}",
        "model.max_seq_len=16",
        f"model.n_layers={n_layers}",
        f"model.d_model={d_model}",
        "model.heads=4",
        f"trainer={trainer}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def run_env(**extra: str) -> dict[str, str]:
    """:func:`repo_env` for a child training run: no launcher variables, one OpenMP thread (the CPU
    cores are shared), unbuffered output (tests read it while the run lives), plus ``extra``."""
    env = {k: v for k, v in repo_env().items() if not k.startswith(LAUNCHER_VARS)}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_train_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``python train.py *args`` from the checkout in a child process with :func:`run_env`; output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], env=run_env(), capture_output=True, text=True, timeout=timeout
    )


def _release(package: str) -> tuple[int, int] | None:
    """(major, minor) of an installed distribution, None when it is not installed."""
    try:
        major, minor, *_ = version(package).split(".")
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except (PackageNotFoundError, ValueError):
        return None


def interpreter_unusable() -> str | None:
    """Why the Triton interpreter cannot run our kernels here, or None. Triton before 3.7 turns a
    loop bound into a Python int with ``int(array)`` on a one-element array, which NumPy 2.4 made a
    TypeError (triton-lang/triton#9171, fixed by #9172): every kernel whose loop bounds come from the
    program id fails under TRITON_INTERPRET=1 there, though it compiles and runs on a GPU."""
    triton, numpy = _release("triton"), _release("numpy")
    if triton is not None and numpy is not None and triton < (3, 7) and numpy >= (2, 4):
        return f"Triton {triton[0]}.{triton[1]}'s interpreter fails on NumPy >= 2.4 (triton-lang/triton#9171)"
    return None


def run_interpreted(cases: str) -> subprocess.CompletedProcess[str]:
    """pytest on ``cases`` (a path under the checkout) in a child process with TRITON_INTERPRET=1,
    which Triton reads once at import, so it cannot be set in this process."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", cases],
        cwd=ROOT,
        env=repo_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
