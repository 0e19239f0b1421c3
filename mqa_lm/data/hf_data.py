"""Record sources read with Arrow: ``.parquet`` files in ``data.paths`` and Hugging Face ``datasets``
(``data=hf``: ``data.name`` + ``data.split`` + ``data.text_field``).

``data.name`` is one of:

* a ``save_to_disk`` directory (``Dataset`` or ``DatasetDict``), read memory-mapped with ``load_from_disk``;
* a local data file (``.parquet``, ``.arrow``, ``.json``/``.jsonl``, ``.csv``, ``.txt``) or a directory of
  them, read with ``load_dataset``; the Arrow conversion goes to ``<data.cache_dir>/hf-datasets``;
* anything else: a dataset on the Hugging Face Hub (``data.subset`` picks its configuration),
  cached where ``datasets`` caches (``HF_DATASETS_CACHE``).

Each non-empty string of the text field is one document; null values are skipped. The cache key of
a local dataset covers every file under it (path, size, mtime), of a Hub dataset its revision, and
always the split and the field, so changing any of them prepares the data again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mqa_lm.data.sources import BATCH_ROWS, INSTALL_HINT, SourceError, SourceFile, check_text
from mqa_lm.data.store import mark_cache_dir

# Local data files load_dataset reads, by suffix -> its packaged builder.
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
# Datasets with fewer rows finish reading before a bar is worth drawing.
PROGRESS_ROWS = 200_000


# ---- data=hf ------------------------------------------------------------------------------------


def require_datasets() -> Any:
    """The ``datasets`` module, or one error saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data.name (data=hf) needs the Hugging Face `datasets` package: {INSTALL_HINT}") from None
    return datasets


def _is_saved(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


# What data.split and data.text_field mean when left null (DataConfig fills them in).
DEFAULT_SPLIT = "train"
DEFAULT_TEXT_FIELD = "text"


@dataclass(frozen=True)
class HFSource(SourceFile):
    """A ``datasets`` split as one source: ``path`` is the local path, or the Hub name as a path."""

    name: str = ""
    subset: str | None = None
    split: str = DEFAULT_SPLIT
    text_field: str = DEFAULT_TEXT_FIELD
    streaming: bool = False
    local: bool = False
    cache_root: str = ""
    revision: str | None = None  # a Hub dataset's revision (its commit), when it could be looked up

    def identity(self) -> list[Any]:
        """What the cache key hashes: the split, the field, and the local files' stats or the Hub revision."""
        ident: list[Any] = ["hf", self.subset, self.split, self.text_field]
        if self.local:
            root = self.path
            return [
                *ident,
                str(root),
                [
                    [p.relative_to(root).as_posix() if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns]
                    for p in _local_files(root)
                ],
            ]
        return [*ident, self.name, self.revision]

    def describe(self) -> str:
        subset = f", subset {self.subset}" if self.subset else ""
        return f"{self.name} (split {self.split}{subset}, field {self.text_field})"

    def record_texts(self, field: str) -> Iterator[str]:
        """Every non-empty string of ``text_field`` (``field``, the JSONL setting, does not apply)."""
        dataset = open_dataset(self.name, self.subset, self.split, self.streaming, self.cache_root)
        columns = dataset.column_names
        if columns is not None and self.text_field not in columns:
            raise SourceError(_missing_field(self.name, self.text_field, columns))
        total = getattr(dataset, "num_rows", None)
        found = False
        with tqdm(
            total=total,
            unit="rec",
            unit_scale=True,
            desc=f"read {Path(self.name).name}",
            disable=total is not None and total < PROGRESS_ROWS,
        ) as bar:
            for batch in dataset.select_columns([self.text_field]).iter(batch_size=BATCH_ROWS):
                values = batch[self.text_field]
                bar.update(len(values))
                for value in values:
                    text = check_text(value, self.text_field, self.describe(), "data.text_field")
                    if text:
                        found = True
                        yield text
        if not found:
            raise SourceError(
                f"data.name: {self.describe()} holds no non-empty text; set data.text_field or data.split"
            )


def _missing_field(name: str, field: str, columns: list[str]) -> str:
    return (
        f"data.text_field={field!r} is not a column of {name} (it has: {columns}); set data.text_field to one of them"
    )


def _unknown_split(name: str, split: str, splits: list[str]) -> ValueError:
    return ValueError(f"unknown data.split {split!r}: {name} has splits {splits}; set data.split to one of them")


@lru_cache(maxsize=8)
def _load(name: str, subset: str | None, split: str, streaming: bool, cache_root: str, stamp: str) -> Any:
    del stamp  # only part of the cache key: a changed local dataset is opened again
    datasets = require_datasets()
    path = Path(name).expanduser()
    if _is_saved(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise _unknown_split(name, split, list(loaded))
            return loaded[split]
        # A single saved Dataset is one split: the one it records, the default when it records none.
        own = str(loaded.split) if loaded.split is not None else DEFAULT_SPLIT
        if split != own:
            raise _unknown_split(name, split, [own])
        return loaded
    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if path.exists():
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"data.name={name!r} is a {path.suffix or 'suffix-less'} file; data=hf reads "
                    f"{', '.join(BUILDERS)} files or save_to_disk directories (plain text: data=text data.paths=...)"
                )
            args: tuple[Any, ...] = (builder,)
            kwargs["data_files"] = str(path.resolve())
        else:
            args = (str(path.resolve()),)
        if not streaming:
            hf_cache = Path(cache_root) / "hf-datasets"
            mark_cache_dir(hf_cache)  # directory walks over data.paths never read our conversions
            kwargs["cache_dir"] = str(hf_cache)
    else:
        args = (name, subset)
    try:
        return datasets.load_dataset(*args, **kwargs)
    except ValueError as err:
        message = str(err)
        if message.startswith(("Unknown split", "Bad split")):  # datasets names the splits it has
            raise ValueError(f"unknown data.split {split!r}: {name}: {message}; set data.split") from None
        raise ValueError(f"data.name={name!r} could not be loaded: {message}") from None
    except FileNotFoundError as err:
        raise ValueError(
            f"data.name={name!r} is neither a local path (looked for {path.resolve()}) nor a dataset on the "
            f"Hugging Face Hub that can be reached ({err}); fix the name or the path"
        ) from None
    except (ConnectionError, OSError) as err:
        raise ValueError(f"data.name={name!r}: the Hugging Face Hub cannot be reached ({err})") from None


def open_dataset(name: str, subset: str | None, split: str, streaming: bool, cache_root: str) -> Any:
    """The ``datasets.Dataset`` (or ``IterableDataset`` when streaming) of one split; errors name the key.

    Kept open (``lru_cache``), so the passes over the data (scan, tokenizer, token files) open it once.
    """
    path = Path(name).expanduser()
    local = _local_files(path) if path.exists() else []
    stamp = repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in local])
    return _load(name, subset, split, bool(streaming), str(cache_root), stamp)


@lru_cache(maxsize=8)  # asked at construction, prepare_data and setup: once per process is enough
def _hub_revision(name: str, subset: str | None) -> str | None:
    """The Hub dataset's current revision, or None when it cannot be looked up (offline: reuse what is cached)."""
    datasets = require_datasets()
    try:
        return str(datasets.load_dataset_builder(name, subset).hash)
    except Exception:  # offline or rate limited: the prepared data, if any, is the best there is
        return None


def check_dataset(name: str, subset: str | None, split: str, text_field: str, cache_root: str) -> None:
    """Before any work: the dataset opens, has ``split`` and a ``text_field`` column (one error naming the key).

    Local files and the Hub are opened streaming for this, so nothing is converted or downloaded yet.
    """
    path = Path(name).expanduser()
    dataset = open_dataset(name, subset, split, not _is_saved(path), cache_root)
    columns = dataset.column_names
    if columns is None:  # a streamed dataset without declared features: look at its first record
        first = next(iter(dataset), None)
        columns = sorted(first) if isinstance(first, dict) else []
    if text_field not in columns:
        raise ValueError(_missing_field(name, text_field, list(columns)))


def resolve_hf_source(config: Any, cache_root: Path) -> HFSource:
    """The one source of ``data=hf`` for a :class:`~mqa_lm.data.config.DataConfig` (cheap: stats local files,
    or asks the Hub for the revision)."""
    name = config.name
    if name is None:
        raise ValueError("data=hf needs data.name=<Hub dataset name, save_to_disk directory or data file>")
    path = Path(name).expanduser()
    local = path.exists()
    return HFSource(
        path=path.resolve() if local else Path(name),
        origin=name,
        explicit=True,
        name=name,
        subset=config.subset,
        split=config.split or DEFAULT_SPLIT,
        text_field=config.text_field or DEFAULT_TEXT_FIELD,
        streaming=config.streaming,
        local=local,
        cache_root=os.fspath(cache_root),
        revision=None if local else _hub_revision(name, config.subset),
    )
