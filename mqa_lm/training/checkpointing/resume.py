"""Which checkpoint a run starts from: an explicit ``ckpt_path``, or (``resume=auto``) the newest valid
checkpoint of the run's checkpoint directories; a truncated or corrupt one is skipped with a warning,
one that carries pickled code is refused."""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mqa_lm.pretrained.checkpoint import CorruptCheckpointError, load_weights_only, verify_checkpoint
from mqa_lm.training.checkpointing.io import HPC_PATTERN
from mqa_lm.training.config import SPECIAL_CKPT_PATHS, check_ckpt_path, check_resume_mode


def _candidates(checkpoint_dirs: Iterable[Path], hpc_dirs: Iterable[Path]) -> list[Path]:
    found: dict[Path, None] = {}
    for directory in checkpoint_dirs:
        if directory.is_dir():
            for p in directory.iterdir():
                if p.suffix == ".ckpt" and not p.name.startswith("."):
                    found[p.resolve()] = None
    for directory in hpc_dirs:
        if directory.is_dir():
            for p in directory.iterdir():
                if HPC_PATTERN.match(p.name):
                    found[p.resolve()] = None

    def newest_first(p: Path) -> tuple[int, int, bool, str]:
        hpc = HPC_PATTERN.match(p.name)
        # last.ckpt first among equals: at an improving validation it is a hard link to the best file.
        return (p.stat().st_mtime_ns, int(hpc.group(1)) if hpc else -1, p.name == "last.ckpt", p.name)

    # One entry per file: the names of one hard-linked file are one candidate, under its preferred name.
    files: dict[tuple[int, int], Path] = {}
    for p in sorted(found, key=newest_first, reverse=True):
        stat = p.stat()
        files.setdefault((stat.st_dev, stat.st_ino), p)
    return list(files.values())


def find_resume_checkpoint(checkpoint_dirs: Sequence[str | Path], hpc_dirs: Sequence[str | Path] = ()) -> Path | None:
    """The newest valid checkpoint: any ``*.ckpt`` in ``checkpoint_dirs``, ``hpc_ckpt_N.ckpt`` in ``hpc_dirs``.

    Newest means last modified (``last.ckpt``, a step checkpoint and Lightning's hpc checkpoint
    compete on equal terms). A corrupt candidate is skipped with a warning that names it and the
    next one is tried; an unsafe one (pickled code) raises :class:`UnsafeCheckpointError`.
    Nothing is deleted or rewritten. Leftover temp files of interrupted atomic writes are reported.
    """
    dirs = [Path(d) for d in checkpoint_dirs]
    hpc = [Path(d) for d in hpc_dirs]
    for directory in dirs:
        stale = sorted(directory.glob(".*.ckpt.*.tmp")) if directory.is_dir() else []
        if stale:
            warnings.warn(
                f"{len(stale)} temp file(s) of interrupted checkpoint writes in {directory} "
                f"(e.g. {stale[0].name}); they are not used and can be deleted",
                stacklevel=2,
            )
    for candidate in _candidates(dirs, hpc):
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as err:
            warnings.warn(f"skipping checkpoint: {err}; trying the previous one", stacklevel=2)
            continue
        return candidate
    return None


def resume_checkpoint(
    ckpt_path: str | None, resume: str, checkpoint_dirs: Sequence[str | Path], hpc_dirs: Sequence[str | Path] = ()
) -> str | None:
    """The checkpoint ``trainer.fit`` should start from, or None for a fresh run.

    An explicit ``ckpt_path`` wins (and is verified, with no fallback); else ``resume="auto"`` looks
    for the newest valid checkpoint in ``checkpoint_dirs`` (``*.ckpt``) and ``hpc_dirs``
    (``hpc_ckpt_N.ckpt``); ``resume="never"`` starts fresh.
    """
    check_ckpt_path(ckpt_path)
    if ckpt_path:
        if ckpt_path not in SPECIAL_CKPT_PATHS:
            verify_checkpoint(ckpt_path)
        return str(ckpt_path)
    if check_resume_mode(resume) == "never":
        return None
    found = find_resume_checkpoint(checkpoint_dirs, hpc_dirs)
    if found is not None and _is_rank_zero():
        print(f"resuming from {found} (resume=auto; resume=never starts fresh)", flush=True)
    return None if found is None else str(found)


def checkpoint_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """``(global_step, hyper_parameters)`` of a verified Lightning checkpoint file (tensors memory-mapped,
    not read); ``(global_step, {})`` for a sharded directory's ``meta.pt`` or when there are none."""
    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"
        if not path.is_file():
            return -1, {}
    ckpt = load_weights_only(path, mmap=zipfile.is_zipfile(path))
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return int(ckpt.get("global_step", -1)), dict(hparams) if isinstance(hparams, dict) else {}


def _is_rank_zero() -> bool:
    # Before the Trainer exists the launcher's environment is the only record of the rank.
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True
