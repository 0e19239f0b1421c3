"""Files that must never be seen half-written, and text files read with errors that name the byte.

:func:`atomic_write` writes to a temp file in the target's own directory and renames it into place,
so a kill mid-write leaves the previous file whole. :func:`read_text_utf8` and :func:`decode_utf8`
raise :class:`NotUTF8Error` naming the file and the offset of the first bad byte.
:func:`dir_write_problem` says why a directory could not be created and written, before any work.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
