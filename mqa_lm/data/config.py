"""``DataConfig``: every setting of :class:`~mqa_lm.data.TextDataModule`, validated on construction.

Errors name the config key (``data.block_size must be >= 1, got 0``). The checks here touch nothing
but a ``tokenizer.json`` given with ``tokenizer=file``; whether the sources exist is checked when
the datamodule resolves them (still before any work).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mqa_lm.config_fields import DictRoundTrip
from mqa_lm.data.sources import normalize_paths
from mqa_lm.data.tokenizer import MIN_BPE_VOCAB, TOKENIZER_KINDS, load_tokenizer


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"data.{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"data.{name} must be >= {minimum}, got {value}")
    return int(value)


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
    """

    config_group: ClassVar[str] = "data"

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
        self.vocab_size = _check_int("vocab_size", self.vocab_size, 1)
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
            self.max_chars = _check_int("max_chars", self.max_chars, 1)
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise TypeError(f"data.seed must be an integer, got {self.seed!r}")
        self.seed = int(self.seed)
        if not isinstance(self.cache_dir, (str, Path)) or not str(self.cache_dir):
            raise ValueError(f"data.cache_dir must be a directory path, got {self.cache_dir!r}")
        self.cache_dir = str(self.cache_dir)
        self.paths = normalize_paths(self.paths)
        self.block_size = _check_int("block_size", self.block_size, 1)
        self.batch_size = _check_int("batch_size", self.batch_size, 1)
        self.val_batches = _check_int("val_batches", self.val_batches, 1)
        self.num_workers = _check_int("num_workers", self.num_workers, 0)
        if isinstance(self.sha256, Mapping):  # an OmegaConf DictConfig -> a plain dict (checkpointable)
            self.sha256 = dict(self.sha256)

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
