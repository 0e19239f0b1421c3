"""Lightning's side of checkpoint files: :class:`AtomicCheckpointIO` (every checkpoint written with
:func:`mqa_lm.pretrained.checkpoint.atomic_torch_save`) and Lightning's SLURM checkpoint names. The checks
that a checkpoint is whole and safe live in :mod:`mqa_lm.pretrained.checkpoint`, which loading a model needs
without Lightning.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from mqa_lm.pretrained.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_torch_save,
    load_weights_only,
    verify_checkpoint,
)

# Lightning's SLURM checkpoint naming, used by the preemption save and found by resume.
HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def next_hpc_path(directory: str | Path) -> str:
    """``hpc_ckpt_{N+1}.ckpt`` in ``directory`` (Lightning's SLURM checkpoint naming)."""
    directory = Path(directory)
    numbers = [int(m.group(1)) for p in directory.glob("hpc_ckpt_*.ckpt") if (m := HPC_PATTERN.match(p.name))]
    return str(directory / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, with local files written by :func:`atomic_torch_save`.

    Remote URLs (``s3://`` ...) keep Lightning's own writer: object stores publish whole objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


__all__ = [
    "HPC_PATTERN",
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "load_weights_only",
    "next_hpc_path",
    "verify_checkpoint",
]
