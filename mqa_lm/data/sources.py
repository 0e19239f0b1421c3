"""Where the text comes from: ``data.paths`` entries resolved to an ordered list of files, URL
downloads, and streaming reads that never hold a whole file, let alone the corpus, in memory.

An entry is one of:

* a file: one document of UTF-8 text (``.txt``, ``.md``, ``.py``, anything), or, when it ends in
  ``.jsonl``, one JSON object per line whose ``jsonl_field`` string is one document, or, when it ends
  in ``.parquet``, a table whose ``jsonl_field`` column holds one document per row (needs pyarrow);
* a directory: walked recursively; hidden entries and ``__pycache__`` are skipped;
* a glob (``*``, ``?``, ``[``; ``**`` recurses), matched from the current directory;
* an ``http(s)://`` URL: downloaded once into ``<cache_dir>/downloads/`` (see :func:`download`);
* ``stdlib``: the ``.py`` files of this Python's standard library (``sysconfig``), without its test
  suites and installed packages.

Files are sorted within each entry; entries keep the order given. A file named explicitly that is
empty, not UTF-8 or not valid JSONL is an error. Files found by a directory walk, a glob or
``stdlib`` are skipped instead (one warning counts them; empty stdlib files such as bare
``__init__.py`` are skipped quietly), because one stray binary in a folder should not stop a run.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import json
import os
import re
import sysconfig
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

from mqa_lm.data.store import CACHE_MARKER, mark_cache_dir, read_json, write_json
from mqa_lm.utils.files import UTF8_FIX, NotUTF8Error, atomic_write

# Parquet files and HF datasets need pyarrow / datasets, which the [hf] extra installs.
INSTALL_HINT = 'pip install -e ".[hf]"'
BATCH_ROWS = 1024  # records per Arrow batch

STDLIB = "stdlib"
# Directories of the standard library that are not "the library": test suites (mostly generated
# or adversarial inputs) and third-party packages installed next to it.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
READ_BYTES = 1 << 20
# Pieces handed to the tokenizer are about this long; short enough to batch and parallelise,
# long enough that per-call overhead is noise.
PIECE_CHARS = 1 << 18
DOWNLOAD_TIMEOUT_S = 60
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LONE_NEWLINE = re.compile(r"(?<=\S)\n(?=\S)")


class SourceError(ValueError):
    """A source file that cannot be used (not UTF-8, empty, malformed JSONL, changed mid-read)."""


class SourceNotUTF8Error(NotUTF8Error, SourceError):
    """``<path>: not UTF-8 at byte <n> (<reason>); convert it ... or remove it from data.paths``."""

    def __init__(self, path: str | Path, offset: int, reason: str, line: int | None = None) -> None:
        super().__init__(path, offset, reason, f"{UTF8_FIX} or remove it from data.paths", line)


def is_url(entry: str) -> bool:
    return entry.startswith(("http://", "https://"))


@dataclass(frozen=True)
class SourceFile:
    """One input file. For a URL, ``path`` is where its download lives."""

    path: Path
    origin: str  # the data.paths entry it came from, for messages
    explicit: bool  # named directly (problems are errors) rather than discovered (problems skip it)
    url: str | None = None
    sha256: str | None = None  # expected hash of a URL's content

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix.lower() == ".jsonl"

    def identity(self) -> list[Any]:
        """What the cache key hashes: a URL and its expected hash, or a path, size and mtime."""
        if self.url is not None:
            return [self.url, self.sha256]
        stat = self.path.stat()
        return [str(self.path), stat.st_size, stat.st_mtime_ns]

    def describe(self) -> str:
        return self.url or str(self.path)

    def record_texts(self, field: str) -> Iterator[str] | None:
        """The documents of a record file (``.jsonl``, ``.parquet``): its ``field`` strings; None for text."""
        if self.is_jsonl:
            return _jsonl_texts(self.path, field)
        if self.path.suffix.lower() == ".parquet":
            return parquet_texts(self.path, field)
        return None


def normalize_paths(paths: Any) -> list[str]:
    """``data.paths`` as a list of non-empty strings (a single string, list, tuple or ListConfig)."""
    hint = "e.g. data.paths=[corpus/*.txt] or data.paths=stdlib"
    if paths is None:
        raise ValueError(f"data.paths is required: give files, directories, globs, URLs or 'stdlib' ({hint})")
    items = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    if not isinstance(items, Sequence):
        raise TypeError(f"data.paths must be a string or a list of strings, got {type(paths).__name__} ({hint})")
    entries = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"data.paths entries must be strings, got {item!r} ({type(item).__name__})")
        entry = os.fspath(item).strip()
        if not entry:
            raise ValueError(f"data.paths has an empty entry: {list(items)!r}; remove it")
        entries.append(entry)
    if not entries:
        raise ValueError(f"data.paths is empty; give at least one source ({hint})")
    return entries


def normalize_sha256(sha256: Any, urls: list[str]) -> dict[str, str]:
    """``data.sha256`` as {url: lowercase hex}: one string (when there is exactly one URL) or a mapping."""
    if sha256 is None:
        return {}
    if isinstance(sha256, str):
        if len(urls) != 1:
            raise ValueError(
                f"data.sha256 is a single hash but data.paths has {len(urls)} URLs; "
                "give a mapping {url: sha256} instead"
            )
        pairs = {urls[0]: sha256}
    elif isinstance(sha256, Mapping):
        pairs = {str(k): v for k, v in sha256.items()}
        unknown = sorted(set(pairs) - set(urls))
        if unknown:
            raise ValueError(f"data.sha256 names URLs that are not in data.paths: {unknown}; fix the keys")
    else:
        raise TypeError(f"data.sha256 must be a hex string or a {{url: hex}} mapping, got {type(sha256).__name__}")
    out = {}
    for url, value in pairs.items():
        digest = str(value).strip().lower()
        if not _SHA256.fullmatch(digest):
            raise ValueError(f"data.sha256 for {url} must be 64 hex characters, got {value!r}")
        out[url] = digest
    return out


def _marked_dirs(cache_root: Path) -> set[Path]:
    if not cache_root.is_dir():
        return set()
    return {d for d in cache_root.iterdir() if d.is_dir() and (d / CACHE_MARKER).exists()}


def _walk(root: Path, skip_dirs: frozenset[str], suffix: str | None, marked: set[Path]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs and here / d not in marked]
        for name in filenames:
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            path = here / name
            if path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return _walk(root, STDLIB_SKIP_DIRS, ".py", set())


def download_path(cache_root: Path, url: str) -> Path:
    """Where a URL's download lives: named after the URL's last path segment, keyed by the whole URL."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return cache_root / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{safe}"


def resolve_sources(paths: Any, cache_root: Path, sha256: Any = None) -> list[SourceFile]:
    """Turn ``data.paths`` into an ordered, de-duplicated list of files; errors name the bad entry.

    Cheap (stat and directory listings only), so the datamodule calls it at construction to fail
    before any work, and again in ``prepare_data``/``setup`` to see current sizes and mtimes.
    """
    entries = normalize_paths(paths)
    urls = [e for e in entries if is_url(e)]
    hashes = normalize_sha256(sha256, urls)
    marked = _marked_dirs(cache_root)

    def ours(path: Path) -> bool:
        return any(parent in marked for parent in path.parents)

    files: list[SourceFile] = []
    seen: set[str] = set()

    def add(src: SourceFile) -> None:
        key = src.url or str(src.path)
        if key not in seen:
            seen.add(key)
            files.append(src)

    for entry in entries:
        if entry == STDLIB:
            for path in stdlib_files():
                add(SourceFile(path, STDLIB, explicit=False))
        elif is_url(entry):
            add(SourceFile(download_path(cache_root, entry), entry, True, url=entry, sha256=hashes.get(entry)))
        elif any(c in entry for c in "*?["):
            found = []
            for match in sorted(glob(os.path.expanduser(entry), recursive=True)):
                path = Path(match).resolve()
                if path.is_dir() and path not in marked and not ours(path):
                    found.extend(_walk(path, frozenset({"__pycache__"}), None, marked))
                elif path.is_file() and not ours(path):
                    found.append(path)
            if not found:
                raise ValueError(
                    f"data.paths: the glob {entry!r} matches no file (searched from {Path.cwd()}); "
                    "fix the pattern or use an absolute path"
                )
            for path in found:
                add(SourceFile(path, entry, explicit=False))
        else:
            path = Path(entry).expanduser()
            if not path.exists():
                raise ValueError(
                    f"data.paths: {entry!r} does not exist (looked for {path.resolve()}); "
                    "fix the path or remove the entry"
                )
            path = path.resolve()
            if path.is_dir():
                found = _walk(path, frozenset({"__pycache__"}), None, marked)
                if not found:
                    raise ValueError(f"data.paths: directory {entry!r} holds no (non-hidden) files; add text files")
                for p in found:
                    add(SourceFile(p, entry, explicit=False))
            elif path.is_file():
                add(SourceFile(path, entry, explicit=True))
            else:
                raise ValueError(f"data.paths: {entry!r} is neither a regular file nor a directory")
    return files


def download(src: SourceFile) -> None:
    """Fetch ``src.url`` into ``src.path`` once: streamed to a temp file, hashed, checked, renamed.

    A ``<name>.json`` note beside the download records its URL, size and sha256, so later runs reuse
    it without re-reading (and re-fetch when the expected hash changes). Delete the file to re-fetch.
    """
    assert src.url is not None
    note_path = src.path.with_name(src.path.name + ".json")
    note = read_json(note_path)
    if (
        src.path.is_file()
        and isinstance(note, dict)
        and note.get("url") == src.url
        and note.get("size") == src.path.stat().st_size
        and (src.sha256 is None or note.get("sha256") == src.sha256)
    ):
        return
    mark_cache_dir(src.path.parent)
    digest = hashlib.sha256()
    size = 0
    with atomic_write(src.path) as tmp:
        try:
            with urllib.request.urlopen(src.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
                total = response.headers.get("Content-Length")
                with tqdm(
                    total=int(total) if total else None,
                    unit="B",
                    unit_scale=True,
                    desc=f"download {src.path.name}",
                    disable=not total or int(total) < 1 << 24,
                ) as bar:
                    for block in iter(lambda: response.read(READ_BYTES), b""):
                        out.write(block)
                        digest.update(block)
                        size += len(block)
                        bar.update(len(block))
        except (OSError, http.client.HTTPException) as err:
            raise ValueError(
                f"could not download {src.url}: {err}; check the URL, or download the file yourself "
                "and put its local path in data.paths"
            ) from err
        got = digest.hexdigest()
        if src.sha256 is not None and got != src.sha256:
            raise ValueError(
                f"sha256 mismatch for {src.url}: data.sha256 expects {src.sha256} but the download has {got}; "
                "fix data.sha256 (or the URL) - the download was discarded"
            )
    write_json(note_path, {"url": src.url, "sha256": got, "size": size})


def _decoded_blocks(path: Path) -> Iterator[str]:
    """A file's UTF-8 text in blocks; an error names the byte offset of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0
    first = True
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            pending = len(decoder.getstate()[0])  # bytes of a split character held from the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise SourceNotUTF8Error(path, consumed - pending + err.start, err.reason) from None
            consumed += len(block)
            if first and text:
                first = False
                text = text.removeprefix("\ufeff")  # a BOM is encoding metadata, not text
            if text:
                yield text
            if not block:
                return


def _safe_cut(text: str, limit: int) -> int | None:
    """Index just after a lone newline (non-space on both sides): the last one before ``limit``,
    else the first one after it, else None.

    GPT-2-style pre-tokenisation (byte-level BPE) makes such a newline a pre-token of its own and
    merges never cross pre-tokens, so cutting there gives exactly the tokens of the uncut text. (A
    newline after spaces would not do: at the end of a piece it would merge with them.)
    """
    pos = text.rfind("\n", 1, min(limit, len(text) - 1))
    while pos >= 1:
        if not text[pos + 1].isspace() and not text[pos - 1].isspace():
            return pos + 1
        pos = text.rfind("\n", 1, pos)
    match = _LONE_NEWLINE.search(text, limit)
    return None if match is None else match.end()


def _pieces(blocks: Iterable[str]) -> Iterator[str]:
    """Re-cut text blocks into pieces of about PIECE_CHARS at token-neutral boundaries."""
    carry = ""
    for block in blocks:
        carry += block
        while len(carry) >= PIECE_CHARS:
            cut = _safe_cut(carry, PIECE_CHARS)
            if cut is None:
                if len(carry) < 4 * PIECE_CHARS:
                    break  # keep reading: the next block probably has a boundary
                cut = PIECE_CHARS  # text without line structure; a token at the cut may differ
            yield carry[:cut]
            carry = carry[cut:]
    if carry:
        yield carry


def check_text(value: Any, field: str, where: str, fix: str) -> str | None:
    """A record's text, None for a null; anything else is an error naming the field."""
    if value is None or isinstance(value, str):
        return value
    raise SourceError(f"{where}: field {field!r} is a {type(value).__name__}, not a string; set {fix} to a text field")


def parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The non-empty strings of column ``field`` of a Parquet file, streamed by record batch.

    Mirrors ``.jsonl``: the column is ``data.jsonl_field``, one value is one document.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"reading {path} needs pyarrow: {INSTALL_HINT}") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise SourceError(f"{path} is not a readable Parquet file ({err}); fix or remove it from data.paths") from None
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise SourceError(
            f"{path} has no {field!r} column (it has: {columns}); "
            "set data.jsonl_field to the column that holds the text"
        )
    found = False
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            text = check_text(value, field, str(path), "data.jsonl_field")
            if text:
                found = True
                yield text
    if not found:
        raise SourceError(f"data.paths: {path} holds no non-empty {field!r} values; remove it or set data.jsonl_field")


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    offset = 0  # of the line in the file, so a bad byte is named by its place in the file
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SourceNotUTF8Error(path, offset + err.start, err.reason, line=lineno) from None
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a BOM is encoding metadata, not text
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(
                    f"{where} is not valid JSON ({err.msg}); a .jsonl file needs one JSON object per line"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise SourceError(
                    f"{where} has no {text_field!r} field (it has: {keys}); "
                    "set data.jsonl_field to the field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise SourceError(
                    f"{where}: field {text_field!r} is a {type(text).__name__}, not a string; "
                    "set data.jsonl_field to a text field"
                )
            if text:
                yield text


def iter_documents(src: SourceFile, jsonl_field: str) -> Iterator[tuple[bool, str]]:
    """Stream one file as ``(starts_document, piece)`` pairs; a JSONL record is one document."""
    texts = src.record_texts(jsonl_field)
    if texts is not None:
        for text in texts:
            for i, piece in enumerate(_pieces([text])):
                yield i == 0, piece
    else:
        for i, piece in enumerate(_pieces(_decoded_blocks(src.path))):
            yield i == 0, piece


@dataclass
class Corpus:
    """The files that contribute text, and how many characters each contributes, in order.

    Positions are character offsets into the concatenation of all documents; the train/val split
    and ``max_chars`` are both expressed as such offsets.
    """

    files: list[SourceFile]
    chars: list[int]
    jsonl_field: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_chars(self) -> int:
        return sum(self.chars)

    def pieces(self, start: int, end: int) -> Iterator[tuple[bool, str]]:
        """``(starts_document, piece)`` covering characters ``[start, end)``, streamed from disk."""
        offset = 0
        for src, count in zip(self.files, self.chars):
            file_end = offset + count
            if file_end <= start:
                offset = file_end
                continue
            if offset >= end:
                return
            pos = offset
            for starts_doc, piece in iter_documents(src, self.jsonl_field):
                lo, hi = max(start, pos), min(end, file_end, pos + len(piece))
                if hi > lo:
                    yield starts_doc and lo == pos, piece[lo - pos : hi - pos]
                pos += len(piece)
                if pos >= min(end, file_end):
                    break
            if pos < min(end, file_end):
                raise SourceError(f"{src.describe()} changed while it was being read; run again")
            offset = file_end


def scan_corpus(files: list[SourceFile], jsonl_field: str, max_chars: int | None = None) -> Corpus:
    """Read every file once to check it and count its characters (stopping at ``max_chars``).

    Needed before tokenising: the split point is a character offset of the whole corpus, and a bad
    file must be found before the tokenizer is trained on what precedes it.
    """
    corpus = Corpus([], [], jsonl_field)
    total = 0
    for src in tqdm(files, desc="scan sources", unit="file", disable=len(files) < 1000):
        if max_chars is not None and total >= max_chars:
            break
        budget = None if max_chars is None else max_chars - total
        count = 0
        try:
            for _, piece in iter_documents(src, jsonl_field):
                count += len(piece)
                if budget is not None and count >= budget:
                    count = budget
                    break
        except SourceError as err:
            if src.explicit:
                raise
            corpus.skipped.append((src.describe(), str(err)))
            continue
        if count == 0:
            if src.explicit:
                what = "holds no non-empty text records" if src.is_jsonl else "is empty"
                raise SourceError(f"data.paths: {src.describe()} {what}; remove it from data.paths or add text")
            if src.origin != STDLIB:  # the stdlib is full of empty __init__.py files: expected, not news
                corpus.skipped.append((src.describe(), "empty"))
            continue
        corpus.files.append(src)
        corpus.chars.append(count)
        total += count
    if corpus.skipped:
        examples = "; ".join(f"{path}: {why}" for path, why in corpus.skipped[:3])
        warnings.warn(
            f"skipped {len(corpus.skipped)} unusable source file(s) found by directory/glob/stdlib (e.g. {examples})",
            stacklevel=2,
        )
    if not corpus.files:
        raise ValueError(
            f"data.paths: no usable text in {len(files)} file(s) ({len(corpus.skipped)} skipped as empty or "
            "not UTF-8); point data.paths at UTF-8 text"
        )
    return corpus
