"""Training checkpoint files: written atomically, and checked whole and safe before they are loaded.

:func:`atomic_torch_save` writes to a temp file beside the target and renames it into place (fsynced),
so a kill mid-write leaves the previous checkpoint whole; a full disk is one
:class:`CheckpointWriteError`. :func:`verify_checkpoint` raises :class:`CorruptCheckpointError` for a
truncated or damaged file and :class:`UnsafeCheckpointError` for one that carries pickled code (never
loaded). No Lightning here: loading a model (:func:`mqa_lm.pretrained.load_pretrained`) needs these too.
"""

from __future__ import annotations

import errno
import os
import pickle
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class CorruptCheckpointError(CheckpointError):
    """Truncated, unreadable or not a training checkpoint (auto-resume falls back to an older one)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, quota, file-size limit); the files already there
    are intact (writes are atomic)."""


# No space, quota exceeded, file too large: the device refused the bytes, nothing else is wrong.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _device_full(err: BaseException) -> OSError | None:
    """The OSError of a full device in ``err``'s chain (torch wraps its writer's errors in RuntimeError)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class UnsafeCheckpointError(CheckpointError):
    """Carries pickled Python objects that ``weights_only=True`` refuses (never loaded, never skipped)."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file or the complete new one.

    The temp file lives in the target's directory (``os.replace`` is only atomic within one
    filesystem; fsspec's transaction stages in ``$TMPDIR`` and then copies). It is created with
    ``O_EXCL`` and the process umask, fsynced before the rename, and the directory after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        full = _device_full(err) if isinstance(err, Exception) else None
        if full is not None:
            raise CheckpointWriteError(
                f"checkpoint {path.name} could not be written to {path.parent}: "
                f"{os.strerror(full.errno or 0).lower()}; "
                "the checkpoints already there are intact (nothing was overwritten): free space and run the same "
                "command in the same run directory to resume from the newest"
            ) from None
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: str | Path) -> None:
    """Flush ``directory``'s entries (a rename into it) to disk, where the file system allows."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _unsafe_globals(path: Path) -> list[str]:
    """The pickle GLOBALs of a zip checkpoint that ``weights_only`` refuses ([] if it cannot tell)."""
    try:
        return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))
    except Exception:  # a damaged data.pkl: no global can be named, so it is not evidence of code
        return []


def load_weights_only(path: Path, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors.

    Unsafe means a whole zip archive (CRCs already checked by :func:`verify_checkpoint`) whose
    pickle names globals outside torch's allowlist; every other failure, random bytes included (torch
    reads a non-zip file with the legacy unpickler, which refuses garbage opcodes the same way it
    refuses code), is :class:`CorruptCheckpointError`, so auto-resume skips it.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path) if "Weights only load failed" in str(err) and zipfile.is_zipfile(path) else []
        if names:
            # torch's own message suggests weights_only=False, which would run the code: not repeated.
            raise UnsafeCheckpointError(
                f"checkpoint {path} carries pickled Python objects ({', '.join(names)}) and unpickling them can "
                "run arbitrary code, so it is not loaded; if it came from code you trust, load it there and "
                "re-save the weights as plain tensors (state_dict, global_step), or start from another "
                "checkpoint (ckpt_path=...) or run directory"
            ) from None
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt (not a readable torch.save archive)") from None
    except CheckpointError:
        raise
    except Exception as err:  # torch raises RuntimeError/EOFError/... for damaged files
        raise CorruptCheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete, weights-only training checkpoint.

    Files: the zip archive must be whole and every member must match its CRC-32 (a truncated or
    bit-flipped file fails here), then the pickle must load with ``weights_only=True`` and hold
    ``state_dict`` and ``global_step``. Directories (FSDP sharded checkpoints) must hold the
    ``.metadata`` that torch.distributed.checkpoint writes last, and a weights-only ``meta.pt``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise CorruptCheckpointError(
                f"sharded checkpoint {path} has no .metadata (written last), so it is incomplete"
            )
        if (path / "meta.pt").is_file():
            load_weights_only(path / "meta.pt", mmap=False)
        return
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"checkpoint {path} is empty")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                members = zf.infolist()
                # torch.serialization.set_crc32_options(False) writes zero CRCs: nothing to compare then.
                if any(m.CRC for m in members):
                    bad = zf.testzip()
                    if bad is not None:
                        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: member {bad} fails its CRC-32")
        except zipfile.BadZipFile as err:
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt ({err})") from None
    elif path.read_bytes()[:2] == b"PK":
        raise CorruptCheckpointError(f"checkpoint {path} is a truncated zip archive (no central directory)")
    ckpt = load_weights_only(path, mmap=is_zip)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CorruptCheckpointError(
            f"{path} is not a Lightning training checkpoint (no state_dict/global_step; found {keys})"
        )
