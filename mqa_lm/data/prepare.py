"""Prepare a corpus once: tokenizer plus flat token files, cached under a key of everything that
determines them.

Layout of ``<cache_dir>/<name>-<key12>/``: ``tokenizer.json``, ``train.bin``/``train.json``,
``val.bin``/``val.json`` (see :mod:`mqa_lm.data.store`).

The split is by character offset: the corpus is the concatenation of its documents in source
order (capped at ``max_chars``), the first ``int(chars * (1 - val_fraction))`` characters are
``train`` and the rest ``val``, as nanoGPT splits shakespeare_char. The tokenizer only sees the
training part. ``<|endoftext|>`` separates documents within a split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from mqa_lm.data.sources import STDLIB, Corpus, SourceFile, download, scan_corpus
from mqa_lm.data.store import (
    CACHE_MARKER,
    FORMAT_VERSION,
    SPLITS,
    atomic_write,
    file_sha256,
    mark_cache_dir,
    split_paths,
    stale_reason,
    token_dtype,
    write_json,
)
from mqa_lm.data.tokenizer import build_char, load_tokenizer, separator_ids, train_bpe, vocab_size_of

log = logging.getLogger(__name__)

# Corpora at least this long get progress bars; smaller ones finish before a bar is worth drawing.
PROGRESS_CHARS = 4 << 20
# Characters per encode_batch call: enough pieces for the Rust side to spread over cores.
ENCODE_BATCH_CHARS = 4 << 20


@dataclass(frozen=True)
class DataSettings:
    """Everything besides the source files that changes the prepared output."""

    tokenizer: str
    tokenizer_path: str | None
    vocab_size: int
    jsonl_field: str
    val_fraction: float
    max_chars: int | None


def tokenizer_file(settings: DataSettings) -> Path:
    """The user's tokenizer file of ``data.tokenizer=file`` (DataConfig requires the path then)."""
    if settings.tokenizer_path is None:
        raise ValueError("data.tokenizer=file needs data.tokenizer_path=<tokenizer.json>")
    return Path(settings.tokenizer_path).expanduser()


def data_key(files: list[SourceFile], settings: DataSettings) -> str:
    """sha256 over the sources' identities and the settings: equal keys mean equal prepared data."""
    parts = asdict(settings)
    if settings.tokenizer != "bpe":
        parts["vocab_size"] = None  # only BPE uses it; other kinds must not rebuild when it changes
    if settings.tokenizer == "file":
        # The file's content, not its path, decides the tokens.
        parts["tokenizer_path"] = file_sha256(tokenizer_file(settings))
    blob = json.dumps({"format": FORMAT_VERSION, "settings": parts, "sources": [f.identity() for f in files]})
    return hashlib.sha256(blob.encode()).hexdigest()


def prepared_dir(cache_root: Path, files: list[SourceFile], settings: DataSettings, key: str) -> Path:
    """``<cache_root>/<first source>-<tokenizer>-<key12>``: readable, and unique per key."""
    first = files[0]
    stem = STDLIB if first.origin == STDLIB else Path(first.path).stem
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:32] or "corpus"
    kind = f"bpe{settings.vocab_size}" if settings.tokenizer == "bpe" else settings.tokenizer
    return cache_root / f"{slug}-{kind}-{key[:12]}"


# What prepare() writes into a prepared directory (besides CACHE_MARKER and atomic_write's temp files).
PREPARED_FILES = ("tokenizer.json", *(f"{split}.{ext}" for split in SPLITS for ext in ("bin", "json")))


def _new_dirs(directory: Path) -> list[Path]:
    """``directory`` and those of its ancestors that do not exist yet, deepest first."""
    new = []
    while not directory.exists() and directory != directory.parent:
        new.append(directory)
        directory = directory.parent
    return new


def _only_marker_left(directory: Path) -> bool:
    try:
        return [p.name for p in directory.iterdir()] in ([], [CACHE_MARKER])
    except OSError:
        return False


@contextlib.contextmanager
def discarded_on_error(cache_root: Path, directory: Path) -> Iterator[None]:
    """Undo what a failed preparation of ``directory`` made: a data error must not leave an empty or
    useless cache directory behind, one more per try.

    Only directories that did not exist when the block started are touched: the prepared directory
    loses the files preparation writes (:data:`PREPARED_FILES`, then its marker) and is removed if
    that empties it; the downloads directory and the cache root (and parents made with it) go only
    when empty but for a marker. Completed downloads are kept (each is a checked copy of its URL, and
    fetching it again can be slow). An earlier run's data, or anything else already there, is never
    touched. A Ctrl-C is no error: an interrupted preparation keeps its finished files for the next
    run to reuse.
    """
    new_prepared = _new_dirs(directory)
    downloads = cache_root / "downloads"
    new_others = [d for d in [*_new_dirs(downloads), *_new_dirs(cache_root)] if d not in new_prepared]
    try:
        yield
    except Exception:
        if directory in new_prepared:
            for name in PREPARED_FILES:
                (directory / name).unlink(missing_ok=True)
        for d in sorted({*new_prepared, *new_others}, key=lambda p: len(p.parts), reverse=True):
            if d.is_dir() and _only_marker_left(d):
                (d / CACHE_MARKER).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise


def split_point(total_chars: int, val_fraction: float) -> int:
    """Character offset where ``val`` starts."""
    return int(total_chars * (1 - val_fraction))


def _texts(corpus: Corpus, start: int, end: int) -> Iterator[str]:
    for _, piece in corpus.pieces(start, end):
        yield piece


def _build_tokenizer(settings: DataSettings, corpus: Corpus, cut: int) -> Tokenizer:
    if settings.tokenizer == "bpe":
        return train_bpe(_texts(corpus, 0, cut), settings.vocab_size, show_progress=cut >= PROGRESS_CHARS)
    if settings.tokenizer == "char":
        return build_char(_texts(corpus, 0, cut))
    return load_tokenizer(tokenizer_file(settings))


def _token_batches(
    corpus: Corpus, start: int, end: int, tokenizer: Tokenizer, separator: list[int], bar: tqdm
) -> Iterator[np.ndarray]:
    """Token ids of characters ``[start, end)``, in arrays of about ENCODE_BATCH_CHARS characters."""
    first = True
    batch: list[tuple[bool, str]] = []
    size = 0

    def encode() -> np.ndarray:
        nonlocal first
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use.
        encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encodings = encode_batch([piece for _, piece in batch], add_special_tokens=False)
        ids: list[int] = []
        for (starts_doc, _), encoding in zip(batch, encodings):
            if starts_doc and not first:
                ids.extend(separator)
            first = False
            ids.extend(encoding.ids)
        bar.update(sum(len(piece) for _, piece in batch))
        return np.asarray(ids, dtype=np.int64)

    for starts_doc, piece in corpus.pieces(start, end):
        batch.append((starts_doc, piece))
        size += len(piece)
        if size >= ENCODE_BATCH_CHARS:
            yield encode()
            batch, size = [], 0
    if batch:
        yield encode()


def _write_split(
    directory: Path,
    split: str,
    corpus: Corpus,
    span: tuple[int, int],
    tokenizer: Tokenizer,
    tokenizer_sha256: str,
    key: str,
    settings: DataSettings,
) -> dict:
    vocab_size = vocab_size_of(tokenizer)
    dtype = token_dtype(vocab_size)
    bin_path, meta_path = split_paths(directory, split)
    start, end = span
    count = 0
    with (
        tqdm(
            total=end - start,
            unit="char",
            unit_scale=True,
            desc=f"tokenize {split}",
            disable=end - start < PROGRESS_CHARS,
        ) as bar,
        atomic_write(bin_path) as tmp,
        open(tmp, "wb") as out,
    ):
        for ids in _token_batches(corpus, start, end, tokenizer, separator_ids(tokenizer), bar):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"tokenizer produced ids outside [0, {vocab_size}); is the tokenizer.json consistent?")
            ids.astype(dtype).tofile(out)
            count += ids.size
    meta = {
        "format": FORMAT_VERSION,
        "split": split,
        "key": key,
        "tokenizer": settings.tokenizer,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "num_tokens": count,
        "chars": end - start,
        "char_range": [start, end],
        "val_fraction": settings.val_fraction,
        "max_chars": settings.max_chars,
        "sources": [f.describe() for f in corpus.files],
        "skipped": [path for path, _ in corpus.skipped],
    }
    write_json(meta_path, meta)
    return meta


def prepare(files: list[SourceFile], settings: DataSettings, cache_root: Path) -> tuple[Path, str]:
    """Make sure the prepared data for ``files`` + ``settings`` exists and is intact; return (dir, key).

    Does no work when everything is already there and consistent. Otherwise rebuilds only what is
    missing or stale (warning why, when something was there), always from the sources: files are only
    ever written inside the prepared dir and the downloads dir, never elsewhere. A failure leaves no
    directory it created behind (:func:`discarded_on_error`).
    """
    key = data_key(files, settings)
    directory = prepared_dir(cache_root, files, settings, key)
    with discarded_on_error(cache_root, directory):
        return _prepare(files, settings, key, directory)


def _prepare(files: list[SourceFile], settings: DataSettings, key: str, directory: Path) -> tuple[Path, str]:
    tokenizer_path = directory / "tokenizer.json"
    tokenizer = _load_existing(tokenizer_path)
    reasons: dict[str, str | None] = {split: "not prepared yet" for split in SPLITS}
    if tokenizer is not None:
        sha = file_sha256(tokenizer_path)
        reasons = {split: stale_reason(directory, split, key, sha) for split in SPLITS}
        reasons = {split: why for split, why in reasons.items() if why is not None}
        if not reasons:
            log.info("reusing prepared data in %s", directory)
            return directory, key
    for split, why in reasons.items():
        if why != "not prepared yet":
            warnings.warn(f"rebuilding the {split} split in {directory}: {why}", stacklevel=2)
    mark_cache_dir(directory)
    for src in files:
        if src.url is not None:
            download(src)
    corpus = scan_corpus(files, settings.jsonl_field, settings.max_chars)
    cut = split_point(corpus.total_chars, settings.val_fraction)
    if cut == 0 or cut == corpus.total_chars:
        raise ValueError(
            f"data: the corpus has only {corpus.total_chars} characters, too few to split with "
            f"data.val_fraction={settings.val_fraction}; add text to data.paths"
        )
    if tokenizer is None:
        log.info("building the %s tokenizer in %s", settings.tokenizer, directory)
        tokenizer = _build_tokenizer(settings, corpus, cut)
        with atomic_write(tokenizer_path) as tmp:
            if settings.tokenizer == "file":
                # A byte copy, so the prepared tokenizer hashes like the user's file; the original
                # is only read.
                shutil.copyfile(tokenizer_file(settings), tmp)
            else:
                tokenizer.save(str(tmp))
        sha = file_sha256(tokenizer_path)
    spans = {"train": (0, cut), "val": (cut, corpus.total_chars)}
    for split in reasons:
        _write_split(directory, split, corpus, spans[split], tokenizer, sha, key, settings)
    log.info("prepared data in %s", directory)
    return directory, key


def _load_existing(path: Path) -> Tokenizer | None:
    """The tokenizer already in a prepared dir, if it loads.

    Kept rather than retrained when only token files need rebuilding, so checkpoints made with it
    stay valid (its sha256 is what resume checks).
    """
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # a truncated or garbled file: rebuild it
        warnings.warn(f"rebuilding {path}: it does not load as a tokenizer", stacklevel=3)
        return None
