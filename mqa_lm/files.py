"""Files that must never be seen half-written or trusted when damaged: atomic writes, and the checks
that a training checkpoint is whole and safe to load.

The lowest layer of the package (no Lightning, no Hydra): the data cache, exports and checkpoint
readers all build on it. :func:`atomic_write` and :func:`atomic_torch_save` write to a temp file in
the target's own directory and rename it into place, so a kill mid-write leaves the previous file
whole. :func:`verify_checkpoint` raises :class:`CorruptCheckpointError` for a truncated or damaged
file and :class:`UnsafeCheckpointError` for one that carries pickled code (never loaded).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it.

    The temp file lives in the same directory so ``os.replace`` is a same-filesystem atomic rename:
    readers (another rank, a crashed earlier run) see the old file or the whole new one, never a part.
    Unique temp names let concurrent writers of the same file race harmlessly.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates files private to the user; prepared data is meant to be shared like any output.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
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


# ---- reading what users hand in ----------------------------------------------------------------

UTF8_FIX = "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"


class NotUTF8Error(ValueError):
    """A file that should be UTF-8 text is not: ``<path>: not UTF-8 at byte <offset> (<reason>); <fix>``.

    ``path``, ``offset`` (of the first bad byte, from the start of the file) and ``reason`` are kept
    as attributes for callers that word their own message.
    """

    def __init__(self, path: str | Path, offset: int, reason: str, fix: str = UTF8_FIX, line: int | None = None):
        self.path, self.offset, self.reason, self.line = Path(path), offset, reason, line
        where = f"{reason}, line {line}" if line is not None else reason
        super().__init__(f"{path}: not UTF-8 at byte {offset} ({where}); {fix}")


def decode_utf8(data: bytes, path: str | Path, *, start: int = 0, line: int | None = None, fix: str = UTF8_FIX) -> str:
    """``data`` (the bytes of ``path`` from byte ``start`` on) as text; :class:`NotUTF8Error` naming
    the file and the offset in it otherwise. For files read in pieces (lines, blocks)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NotUTF8Error(path, start + err.start, err.reason, fix, line) from None


def read_text_utf8(path: str | Path, *, fix: str = UTF8_FIX) -> str:
    """The whole text of the UTF-8 file ``path``, a leading byte-order mark dropped (it is encoding
    metadata, not text); :class:`NotUTF8Error` (a ValueError) naming the path and the byte offset of
    the first invalid byte otherwise, with ``fix`` as its advice. Open errors are the usual OSError."""
    return decode_utf8(Path(path).read_bytes(), path, fix=fix).removeprefix("\ufeff")


def dir_write_problem(path: str | Path) -> str | None:
    """Why a directory could not be created at ``path`` (as ``mkdir -p`` would) and written into, or
    None when nothing is in the way. Creates nothing.

    Looks at ``path`` when it exists, else at its nearest existing ancestor: a file there
    (``<it> is a file, not a directory``), a read-only file system, or no write permission.
    """
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory" if probe.is_file() else f"{probe} is not a directory"
    if os.access(probe, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): say what access() said
        read_only = False
    return f"{probe} is on a read-only file system" if read_only else f"{probe} is not writable (permission denied)"
