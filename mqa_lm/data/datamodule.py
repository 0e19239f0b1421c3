"""``TextDataModule``: text sources -> tokenizer -> memory-mapped token files -> (x, y) batches.

Lifecycle, as Lightning drives it::

    dm = TextDataModule(paths="stdlib")   # checks every argument and that the sources exist
    dm.prepare_data()                     # local rank 0: download, tokenizer, token files (cached)
    dm.setup("fit")                       # every rank: open the prepared files
    dm.train_dataloader(), dm.val_dataloader()

Resume: the train sampler starts at ``trainer.global_step * trainer.accumulate_grad_batches`` and
micro-batch ``i`` on rank ``r`` is a pure function of ``(seed, i, r)``, so a run continued from a
checkpoint sees exactly the batches the uninterrupted run would have. Set the Trainer's
``use_distributed_sampler=False``: ranks are handled here.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from mqa_lm.data.datasets import ResumeSampler, TrainBatches, TrainLoader, ValWindows
from mqa_lm.data.prepare import DataSettings, data_key, prepare, prepared_dir
from mqa_lm.data.sources import SourceFile, normalize_paths, resolve_sources
from mqa_lm.data.store import SPLITS, TokenFile, file_sha256, read_json, split_paths, stale_reason
from mqa_lm.data.tokenizer import MIN_BPE_VOCAB, TOKENIZER_KINDS, load_tokenizer

STATE_VERSION = 1


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"data.{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"data.{name} must be >= {minimum}, got {value}")
    return int(value)


class TextDataModule(pl.LightningDataModule):
    """A LightningDataModule over tokenized text; see the module docstring for the lifecycle.

    Args:
        paths: files, directories, globs, ``.jsonl`` files, ``http(s)://`` URLs, or ``"stdlib"``
            (this Python's standard library sources); a string or a list (see ``mqa_lm.data.sources``).
        tokenizer: ``"bpe"`` (byte-level BPE trained on the training split), ``"char"`` or ``"file"``.
        tokenizer_path: the ``tokenizer.json`` to use with ``tokenizer="file"``.
        vocab_size: target BPE vocabulary (the trained one can be smaller on a tiny corpus; read
            :attr:`vocab_size` for the real one). Ignored by ``char`` and ``file``.
        jsonl_field: the field of each ``.jsonl`` record that holds its text.
        sha256: expected sha256 of a URL download: a hex string when there is one URL, else a
            ``{url: hex}`` mapping.
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

    def __init__(
        self,
        paths: str | Sequence[str],
        tokenizer: str = "bpe",
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        jsonl_field: str = "text",
        sha256: str | Mapping[str, str] | None = None,
        block_size: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        val_batches: int = 8,
        seed: int = 1337,
        num_workers: int = 0,
        cache_dir: str = "data",
        max_chars: int | None = None,
    ) -> None:
        super().__init__()
        if tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f"unknown data.tokenizer {tokenizer!r}; valid choices are: {', '.join(TOKENIZER_KINDS)}")
        if tokenizer == "file":
            if not tokenizer_path:
                raise ValueError("data.tokenizer=file needs data.tokenizer_path=/path/to/tokenizer.json")
            load_tokenizer(tokenizer_path)  # fail now, with the file named, if it is missing or malformed
        elif tokenizer_path is not None:
            raise ValueError(
                f"data.tokenizer_path is only used with data.tokenizer=file, but data.tokenizer={tokenizer}; "
                "set data.tokenizer=file or drop data.tokenizer_path"
            )
        vocab_size = _check_int("vocab_size", vocab_size, 1)
        if tokenizer == "bpe" and not MIN_BPE_VOCAB <= vocab_size <= 1 << 31:
            raise ValueError(
                f"data.vocab_size={vocab_size} does not fit byte-level BPE: it needs at least {MIN_BPE_VOCAB} "
                "(256 bytes + <|endoftext|>), and a few thousand is typical; e.g. data.vocab_size=4096"
            )
        if not isinstance(jsonl_field, str) or not jsonl_field:
            raise ValueError(f"data.jsonl_field must be a non-empty string, got {jsonl_field!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be a number in (0, 1), got {val_fraction!r}; e.g. 0.05")
        if max_chars is not None:
            max_chars = _check_int("max_chars", max_chars, 1)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"data.seed must be an integer, got {seed!r}")
        if not isinstance(cache_dir, (str, Path)) or not str(cache_dir):
            raise ValueError(f"data.cache_dir must be a directory path, got {cache_dir!r}")

        self.paths = normalize_paths(paths)
        self.block_size = _check_int("block_size", block_size, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.val_batches = _check_int("val_batches", val_batches, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.seed = int(seed)
        self.sha256 = sha256
        self.cache_root = Path(cache_dir).expanduser().resolve()
        self.settings = DataSettings(
            tokenizer=tokenizer,
            tokenizer_path=str(Path(tokenizer_path).expanduser().resolve()) if tokenizer_path else None,
            vocab_size=vocab_size,
            jsonl_field=jsonl_field,
            val_fraction=float(val_fraction),
            max_chars=max_chars,
        )
        self._resolve()  # missing paths, empty globs and bad hashes fail here, before any work

        self._dir: Path | None = None
        self._key: str | None = None
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_sha256: str | None = None
        self._splits: dict[str, TokenFile] = {}
        self._resumed_state: dict[str, Any] | None = None

    # -- preparation -----------------------------------------------------------------------------

    def _resolve(self) -> list[SourceFile]:
        return resolve_sources(self.paths, self.cache_root, self.sha256)

    def _locate(self) -> tuple[Path, str]:
        """(prepared dir, key) for the sources as they are on disk now."""
        files = self._resolve()
        key = data_key(files, self.settings)
        return prepared_dir(self.cache_root, files, self.settings, key), key

    def prepare_data(self) -> None:
        """Download URLs, build the tokenizer and the token files; a no-op when they are current.

        Lightning calls this on local rank 0 only. Safe to call more than once, or from several
        processes at once (every file is written to a unique temp name and renamed into place).
        """
        directory, key = prepare(self._resolve(), self.settings, self.cache_root)
        for split in SPLITS:
            meta = read_json(split_paths(directory, split)[1])
            self._check_long_enough(split, meta["num_tokens"])
        if directory != self._dir:  # the sources changed since the last setup(): forget what it opened
            self._splits, self._tokenizer, self._tokenizer_sha256 = {}, None, None
        self._dir, self._key = directory, key

    def setup(self, stage: str | None = None) -> None:
        """Open the prepared tokenizer and token files (every rank); needs :meth:`prepare_data` first."""
        directory, key = self._locate()
        if self._splits and self._splits["train"].path.parent == directory:
            return  # already open (train.py may call setup before the Trainer does)
        tokenizer_path = directory / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise RuntimeError(
                f"no prepared data at {directory}; call prepare_data() before setup() "
                "(Lightning does this on local rank 0)"
            )
        sha = file_sha256(tokenizer_path)
        for split in SPLITS:
            why = stale_reason(directory, split, key, sha)
            if why is not None:
                raise RuntimeError(
                    f"prepared {split} split in {directory} is not usable ({why}); call prepare_data() to rebuild it"
                )
        self._splits = {split: TokenFile.open(directory, split) for split in SPLITS}
        for split, tokens in self._splits.items():
            self._check_long_enough(split, len(tokens))
        self._dir, self._key = directory, key
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer_sha256 = sha
        if self._resumed_state is not None:
            self._check_resumed_state()

    def _check_long_enough(self, split: str, num_tokens: int) -> None:
        need = self.block_size + 1
        if num_tokens >= need:
            return
        fix = "add text to data.paths or lower data.block_size"
        if split == "val":
            fix += ", or raise data.val_fraction"
        elif self.settings.max_chars is not None:
            fix += ", or raise data.max_chars"
        raise ValueError(
            f"data: the {split} split has {num_tokens} tokens but one window needs data.block_size + 1 = {need}; {fix}"
        )

    # -- tokenizer -------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The prepared ``tokenizers.Tokenizer`` (available once :meth:`prepare_data` has run)."""
        if self._tokenizer is None:
            directory = self._dir or self._locate()[0]
            path = directory / "tokenizer.json"
            if not path.is_file():
                raise RuntimeError(
                    f"the tokenizer does not exist yet ({path}); call prepare_data() (and setup()) first"
                )
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids (largest id + 1); the model's vocabulary must be at least this."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no document separators added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; ``<|endoftext|>`` is kept, so document boundaries stay visible."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # -- dataloaders -----------------------------------------------------------------------------

    def _require_setup(self) -> dict[str, TokenFile]:
        if not self._splits:
            raise RuntimeError("call prepare_data() and setup() before asking for dataloaders")
        return self._splits

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def resume_index(self) -> int:
        """The next training micro-batch: ``global_step * accumulate_grad_batches`` (0 without a trainer).

        Lightning restores ``global_step`` from the checkpoint before it iterates the train loader,
        and the sampler asks here at that moment.
        """
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def epoch_length(self) -> int:
        """Micro-batches per Lightning epoch: the whole run (``max_steps * accumulate``) when
        ``max_steps`` is set, else about one pass over the training tokens. A multiple of the
        accumulation, so an epoch never ends mid-accumulation."""
        trainer = self.trainer
        accumulate = 1 if trainer is None else trainer.accumulate_grad_batches
        if trainer is not None and trainer.max_steps > 0:
            return trainer.max_steps * accumulate
        world = 1 if trainer is None else trainer.world_size
        per_pass = math.ceil(len(self._require_setup()["train"]) / (self.batch_size * self.block_size * world))
        return math.ceil(per_pass / accumulate) * accumulate

    @property
    def train_dataset(self) -> TrainBatches:
        """Micro-batch ``i`` of this rank is ``train_dataset[i]``."""
        rank, _ = self._rank_world()
        return TrainBatches(
            self._require_setup()["train"], self.block_size, self.batch_size, self.seed, rank, self.epoch_length()
        )

    @property
    def val_dataset(self) -> ValWindows:
        rank, world = self._rank_world()
        num_windows = self.val_batches * self.batch_size
        return ValWindows(self._require_setup()["val"], self.block_size, num_windows, rank, world)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        sampler = ResumeSampler(dataset.length, self.resume_index)
        # batch_size=None: each dataset item already is a whole micro-batch.
        return TrainLoader(dataset, batch_size=None, sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, **self._loader_kwargs())

    # -- checkpoint state and summary -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run must agree on to draw the same batches (plain types only)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "key": self._key,
            "tokenizer_sha256": self._tokenizer_sha256,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check a checkpoint's data state against this datamodule (now, or at setup if not set up).

        A different tokenizer is an error (the model's ids would mean other text); other differences
        only warn, since continuing on changed data can be intended.
        """
        self._resumed_state = dict(state_dict)
        if self._tokenizer_sha256 is not None:
            self._check_resumed_state()

    def _check_resumed_state(self) -> None:
        saved = self._resumed_state or {}
        self._resumed_state = None
        theirs = saved.get("tokenizer_sha256")
        if theirs is not None and theirs != self._tokenizer_sha256:
            raise ValueError(
                f"the checkpoint was trained with tokenizer sha256 {theirs[:12]}... but the prepared data in "
                f"{self._dir} uses {self._tokenizer_sha256[:12]}...: its token ids mean different text. Resume "
                "with the original data settings (data.paths, data.tokenizer, data.vocab_size, ...) or start a new run"
            )
        changed = [
            f"{name} {saved[name]!r} -> {value!r}"
            for name, value in (("seed", self.seed), ("block_size", self.block_size),
                                ("batch_size", self.batch_size), ("key", self._key))
            if name in saved and saved[name] != value
        ]
        if changed:
            warnings.warn(
                "resuming with different data settings than the checkpoint (" + "; ".join(changed)
                + "): training continues, but batches differ from the uninterrupted run",
                stacklevel=2,
            )

    def info(self) -> dict[str, Any]:
        """A summary for the start of a run: where the data is, its size and the batch shape."""
        splits = self._require_setup()
        meta = read_json(split_paths(self._dir, "train")[1]) or {}
        return {
            "dir": str(self._dir),
            "sources": list(self.paths),
            "files": len(meta.get("sources", [])),
            "skipped_files": len(meta.get("skipped", [])),
            "tokenizer": self.settings.tokenizer,
            "tokenizer_file": str(self._dir / "tokenizer.json"),
            "vocab_size": self.vocab_size,
            "dtype": splits["train"].dtype.name,
            "train_tokens": len(splits["train"]),
            "val_tokens": len(splits["val"]),
            "train_chars": meta.get("chars"),
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "val_windows": self.val_batches * self.batch_size,
        }
