"""On-disk pieces of a prepared corpus: atomic writes, the flat token files and their JSON sidecars.

A split is two files: ``<split>.bin`` (the token ids, one flat array, no header) and ``<split>.json``
(what built it). The sidecar is written last, so it doubles as the commit marker: a token file
without a matching sidecar, or whose size disagrees with it, is never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from mqa_lm.utils.files import atomic_write

# Bump when the meaning of the token files or sidecars changes, so old caches are rebuilt.
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# A hidden file in every directory this package creates under the cache dir. Directory walks and
# globs over the sources skip marked directories, so `data.paths=[.]` never trains on our own output.
CACHE_MARKER = ".mqa-lm-cache"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any | None:
    """The parsed JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mark_cache_dir(directory: Path) -> None:
    """Create ``directory`` and tag it as ours (see CACHE_MARKER)."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / CACHE_MARKER
    if not marker.exists():
        marker.write_text("Created by mqa_lm.data; safe to delete (it is rebuilt on the next run).\n")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves disk and page-cache use), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_paths(directory: Path, split: str) -> tuple[Path, Path]:
    """(token file, sidecar) of one split."""
    return directory / f"{split}.bin", directory / f"{split}.json"


def stale_reason(directory: Path, split: str, key: str, tokenizer_sha256: str) -> str | None:
    """Why the prepared ``split`` in ``directory`` cannot be used as is, or None when it can."""
    bin_path, meta_path = split_paths(directory, split)
    if not meta_path.exists():
        return "not prepared yet"
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        return f"sidecar {meta_path} is not valid JSON"
    if meta.get("format") != FORMAT_VERSION:
        return f"sidecar format {meta.get('format')!r} is not the current {FORMAT_VERSION}"
    if meta.get("key") != key:
        return "sidecar was written for other sources or settings"
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        return "tokenizer.json changed since the tokens were written"
    vocab_size, num_tokens = meta.get("vocab_size"), meta.get("num_tokens")
    if not isinstance(vocab_size, int) or not isinstance(num_tokens, int) or num_tokens < 0:
        return "sidecar lacks a valid vocab_size or num_tokens"
    dtype = token_dtype(vocab_size)
    if meta.get("dtype") != dtype.name:
        return f"sidecar dtype {meta.get('dtype')!r} does not fit vocab_size {vocab_size} ({dtype.name})"
    if not bin_path.exists():
        return f"token file {bin_path} is missing"
    expected = num_tokens * dtype.itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        return f"token file {bin_path} has {actual} bytes, sidecar says {num_tokens} x {dtype.name} = {expected}"
    return None


class TokenFile:
    """A split's flat token array, a read-only ``np.memmap`` opened by :meth:`map` (or on first use).

    Once mapped, the array stays readable if the file is renamed, moved within its file system or
    deleted: the mapping holds the file, not its path. Forked DataLoader workers (Linux's default)
    share the map. Pickling drops it (pickling a memmap would copy the whole array), so a worker
    started with ``spawn`` re-opens the file by its path; the OS page cache is shared either way.
    """

    def __init__(self, path: Path, dtype: np.dtype | str, num_tokens: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.num_tokens = int(num_tokens)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._array

    def map(self) -> TokenFile:
        """Open the memory map now (an OSError if the file is gone); returns self."""
        _ = self.array
        return self

    def __len__(self) -> int:
        return self.num_tokens

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    @classmethod
    def open(cls, directory: Path, split: str) -> TokenFile:
        """The token file of a split whose sidecar has been checked with :func:`stale_reason`."""
        bin_path, meta_path = split_paths(directory, split)
        meta = read_json(meta_path)
        if meta is None:
            raise ValueError(f"{meta_path} is missing or unreadable; delete {directory} to prepare the data again")
        return cls(bin_path, meta["dtype"], meta["num_tokens"])
