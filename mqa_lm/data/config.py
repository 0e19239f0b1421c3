"""``DataConfig``: every setting of :class:`~mqa_lm.training.datamodule.TextDataModule`, validated on construction.

Errors name the config key (``data.block_size must be >= 1, got 0``). The checks here touch nothing
but a ``tokenizer.json`` given with ``tokenizer=file`` and, with ``data.name`` (``data=hf``), the
dataset's split and columns (opened without converting or downloading its data); whether the files
of ``data.paths`` exist is checked when the datamodule resolves them (still before any work).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mqa_lm.utils.config import DictRoundTrip, check_int
from mqa_lm.data.hf_data import DEFAULT_SPLIT, DEFAULT_TEXT_FIELD
from mqa_lm.data.sources import normalize_paths
from mqa_lm.data.tokenizer import MIN_BPE_VOCAB, TOKENIZER_KINDS, load_tokenizer


@dataclass
class DataConfig(DictRoundTrip):
    """The ``data`` config group (configs/data/text.yaml lists every field with its meaning).

    Args:
        paths: files, directories, globs, ``.jsonl`` files, ``http(s)://`` URLs, or ``"stdlib"``
            (this Python's standard library sources); a string or a list (see ``mqa_lm.data.sources``).
            Stored as a list of strings.
        tokenizer: ``"bpe"`` (byte-level BPE trained on the training split), ``"char"`` or ``"file"``.
        tokenizer_path: the ``tokenizer.json`` to use with ``tokenizer="file"``.
        vocab_size: target BPE vocabulary (the trained one can be smaller on a tiny corpus; the
            datamodule's ``vocab_size`` is the real one). Ignored by ``char`` and ``file``.
        jsonl_field: the field of each ``.jsonl`` record that holds its text.
        sha256: expected sha256 of a URL download: a hex string when there is one URL, else a
            ``{url: hex}`` mapping (checked against the URLs when the sources are resolved).
        block_size: tokens per training window (the model sees ``block_size``, targets are shifted).
        batch_size: windows per micro-batch, per rank.
        val_fraction: the last ``val_fraction`` of the corpus' characters form the validation split.
        val_batches: validation uses ``val_batches * batch_size`` fixed windows, sharded over ranks.
        seed: seeds the training windows (together with micro-batch index and rank).
        num_workers: DataLoader worker processes.
        cache_dir: prepared data goes to ``<cache_dir>/<name>-<key>/``, downloads to
            ``<cache_dir>/downloads/``.
        max_chars: use only the first ``max_chars`` characters of the corpus (e.g. a fast CPU run).
        name: a Hugging Face dataset instead of ``paths`` (``data=hf``): a Hub name, a ``save_to_disk``
            directory, or a local ``.parquet``/``.arrow``/``.json(l)``/``.csv``/``.txt`` file or directory of
            them (see :mod:`mqa_lm.data.hf_data`). Checked here: it opens, has ``split`` and ``text_field``.
        subset: the Hub dataset's configuration (``load_dataset(name, subset)``), e.g. ``wikitext-2-raw-v1``.
        split: the dataset split to read (default ``train``); ``val_fraction`` of it becomes validation.
        text_field: the column that holds the text (default ``text``).
        streaming: read the Hub dataset (or local files) as a stream instead of caching it as Arrow first;
            each pass over the data (scan, tokenizer, tokens) streams it again, so pair it with ``max_chars``.
    """

    config_group: ClassVar[str] = "data"
    key_prefix: ClassVar[str] = "data."

    paths: str | list[str] | None = None
    tokenizer: str = "bpe"
    tokenizer_path: str | None = None
    vocab_size: int = 4096
    jsonl_field: str = "text"
    sha256: str | dict[str, str] | None = None
    block_size: int = 256
    batch_size: int = 32
    val_fraction: float = 0.05
    val_batches: int = 8
    seed: int = 1337
    num_workers: int = 0
    cache_dir: str = "data"
    max_chars: int | None = None
    name: str | None = None
    subset: str | None = None
    split: str | None = None
    text_field: str | None = None
    streaming: bool = False

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(
                f"unknown data.tokenizer {self.tokenizer!r}; valid choices are: {', '.join(TOKENIZER_KINDS)}"
            )
        if self.tokenizer == "file":
            if not self.tokenizer_path:
                raise ValueError("data.tokenizer=file needs data.tokenizer_path=/path/to/tokenizer.json")
            load_tokenizer(self.tokenizer_path)  # fail now, with the file named, if it is missing or malformed
            self.tokenizer_path = str(Path(self.tokenizer_path).expanduser().resolve())
        elif self.tokenizer_path is not None:
            raise ValueError(
                f"data.tokenizer_path is only used with data.tokenizer=file, but data.tokenizer={self.tokenizer}; "
                "set data.tokenizer=file or drop data.tokenizer_path"
            )
        self.vocab_size = check_int(self.vocab_size, "data.vocab_size")
        if self.tokenizer == "bpe" and not MIN_BPE_VOCAB <= self.vocab_size <= 1 << 31:
            raise ValueError(
                f"data.vocab_size={self.vocab_size} does not fit byte-level BPE: it needs at least {MIN_BPE_VOCAB} "
                "(256 bytes + <|endoftext|>), and a few thousand is typical; e.g. data.vocab_size=4096"
            )
        if not isinstance(self.jsonl_field, str) or not self.jsonl_field:
            raise ValueError(f"data.jsonl_field must be a non-empty string, got {self.jsonl_field!r}")
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
            raise ValueError(f"data.val_fraction must be a number in (0, 1), got {fraction!r}; e.g. 0.05")
        self.val_fraction = float(fraction)
        if self.max_chars is not None:
            self.max_chars = check_int(self.max_chars, "data.max_chars")
        self.seed = check_int(self.seed, "data.seed", minimum=None)
        if not isinstance(self.cache_dir, (str, Path)) or not str(self.cache_dir):
            raise ValueError(f"data.cache_dir must be a directory path, got {self.cache_dir!r}")
        self.cache_dir = str(self.cache_dir)
        if self.name is None:
            self._check_unused_hf_fields()
            self.paths = normalize_paths(self.paths)
        else:
            self._check_hf_fields()
        self.block_size = check_int(self.block_size, "data.block_size")
        self.batch_size = check_int(self.batch_size, "data.batch_size")
        self.val_batches = check_int(self.val_batches, "data.val_batches")
        self.num_workers = check_int(self.num_workers, "data.num_workers", minimum=0)
        if isinstance(self.sha256, Mapping):  # an OmegaConf DictConfig -> a plain dict (checkpointable)
            self.sha256 = dict(self.sha256)

    def _check_unused_hf_fields(self) -> None:
        if self.paths is None:
            raise ValueError(
                "no data source: set data.paths=[files, directories, globs, URLs or stdlib] (data=text) or "
                "data.name=<Hub dataset name, save_to_disk directory or data file> (data=hf)"
            )
        for key in ("subset", "split", "text_field"):
            if getattr(self, key) is not None:
                fix = "; for .jsonl/.parquet files in data.paths use data.jsonl_field" if key == "text_field" else ""
                raise ValueError(
                    f"data.{key}={getattr(self, key)!r} is only used with a Hugging Face dataset "
                    f"(data=hf data.name=...){fix}"
                )
        if self.streaming is not False:
            raise ValueError(f"data.streaming={self.streaming!r} is only used with data=hf data.name=...")

    def _check_hf_fields(self) -> None:
        from mqa_lm.data.hf_data import check_dataset, require_datasets

        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"data.name must be a dataset name or a local path, got {self.name!r}")
        if self.paths not in (None, []):
            raise ValueError(
                f"data.paths={self.paths!r} and data.name={self.name!r} both name the data; "
                "use data=text data.paths=... or data=hf data.name=..., not both"
            )
        self.paths = []
        self.split = DEFAULT_SPLIT if self.split is None else self.split
        self.text_field = DEFAULT_TEXT_FIELD if self.text_field is None else self.text_field
        for key in ("split", "text_field"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{key} must be a non-empty string, got {value!r}")
        if self.subset is not None and (not isinstance(self.subset, str) or not self.subset):
            raise ValueError(f"data.subset must be a configuration name or null, got {self.subset!r}")
        if not isinstance(self.streaming, bool):
            raise TypeError(f"data.streaming must be true or false, got {self.streaming!r}")
        require_datasets()
        check_dataset(
            self.name, self.subset, self.split, self.text_field, str(Path(self.cache_dir).expanduser().resolve())
        )

    @classmethod
    def coerce(cls, config: DataConfig | str | Sequence[str] | None, fields: Mapping[str, Any]) -> DataConfig:
        """A :class:`DataConfig` from one, or from ``data.paths`` (or None) plus other fields by name."""
        if isinstance(config, DataConfig):
            if fields:
                raise TypeError(f"give a DataConfig or its fields, not both (got also {sorted(fields)})")
            return config
        values = dict(fields)
        if config is not None:
            if "paths" in values:
                raise TypeError("data.paths given twice (positionally and as paths=...)")
            values["paths"] = config
        return cls.from_dict(values)
