"""W&B artifacts of a run (``logger.wandb.log_model=true``): the best checkpoint and the model export.

Online, W&B copies each file to its staging area and uploads it. Offline, the files are first
copied into the offline run's own directory (``<offline-run>/artifacts/<name>/``) and referenced from
there, so ``wandb sync <offline-run>`` uploads exactly what the run logged even after the run
directory's checkpoints and export have been replaced by a continued run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from mqa_lm.pretrained.directory import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE

CHECKPOINT_FILE = "model.ckpt"  # the name inside the artifact, as Lightning's WandbLogger uses
EXPORT_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE)


def is_offline(run: Any) -> bool:
    settings = getattr(run, "settings", None)
    return getattr(settings, "mode", None) in ("offline", "dryrun")


def best_checkpoint(callback: ModelCheckpoint) -> tuple[Path, list[str], dict[str, Any]] | None:
    """(file, aliases, metadata) of the callback's best checkpoint, or its last when it never scored."""
    score = callback.best_model_score
    if callback.best_model_path and Path(callback.best_model_path).is_file():
        path, aliases = Path(callback.best_model_path), ["best", "latest"]
    elif callback.last_model_path and Path(callback.last_model_path).is_file():
        path, aliases, score = Path(callback.last_model_path), ["latest"], None
    else:
        return None
    metadata = {
        "score": None if score is None else float(score),
        "monitor": callback.monitor,
        "mode": callback.mode,
        "original_filename": path.name,
    }
    return path, aliases, metadata


def export_files(directory: Path) -> dict[str, Path] | None:
    """The files of a model export directory by name, or None when it holds no exported weights."""
    if not (directory / MODEL_FILE).is_file():
        return None
    return {name: directory / name for name in EXPORT_FILES if (directory / name).is_file()}


def export_metadata(files: Mapping[str, Path]) -> dict[str, Any]:
    """The exported architecture (its ``config.json``), so the W&B UI shows what the weights are."""
    config = files.get(CONFIG_FILE)
    if config is None:
        return {}
    try:
        return {"config": json.loads(config.read_text(encoding="utf-8"))}
    except (OSError, ValueError):
        return {}


def log_files(run: Any, name: str, files: Mapping[str, Path], metadata: dict[str, Any], aliases: list[str]) -> Any:
    """Log ``files`` (artifact path -> local file) as one ``model`` artifact of ``run``; returns it.

    Offline the files are copied into the offline run directory first (see the module docstring).
    """
    import wandb

    artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
    offline = is_offline(run)
    if offline:
        stage = Path(run.dir).parent / "artifacts" / name
        stage.mkdir(parents=True, exist_ok=True)
    for target, source in files.items():
        if offline:
            copy = stage / target
            shutil.copyfile(source, copy)
            # immutable: W&B references the copy instead of staging one more; nothing rewrites it.
            artifact.add_file(str(copy), name=target, policy="immutable")
        else:
            artifact.add_file(str(source), name=target)
    run.log_artifact(artifact, aliases=aliases)
    return artifact
