"""``TextDataModule``: text sources -> tokenizer -> memory-mapped token files -> (x, y) batches.

Lifecycle, as Lightning drives it::

    dm = TextDataModule("stdlib")         # checks every setting (a DataConfig) and that the sources exist
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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from mqa_lm.data.config import DataConfig
from mqa_lm.data.datasets import ResumeSampler, TrainBatches, TrainLoader, ValWindows
from mqa_lm.data.prepare import DataSettings, data_key, discarded_on_error, prepare, prepared_dir
from mqa_lm.data.sources import SourceFile, resolve_sources
from mqa_lm.data.store import SPLITS, TokenFile, file_sha256, read_json, split_paths, stale_reason

STATE_VERSION = 1


class TextDataModule(pl.LightningDataModule):
    """A LightningDataModule over tokenized text; see the module docstring for the lifecycle.

    Args:
        config: a :class:`DataConfig`; or ``data.paths`` (or nothing) with the other
            :class:`DataConfig` fields as keywords, e.g. ``TextDataModule("stdlib", block_size=128)``.
            Every value is checked here, and the sources are resolved (missing paths, empty globs
            and bad hashes fail now, before any work).
    """

    def __init__(self, config: DataConfig | str | Sequence[str] | None = None, /, **fields: Any) -> None:
        super().__init__()
        self.config = DataConfig.coerce(config, fields)
        self.paths: list[str] = list(cast(list[str], self.config.paths))  # normalized by DataConfig
        self.block_size = self.config.block_size
        self.batch_size = self.config.batch_size
        self.val_batches = self.config.val_batches
        self.num_workers = self.config.num_workers
        self.seed = self.config.seed
        self.sha256 = self.config.sha256
        self.cache_root = Path(self.config.cache_dir).expanduser().resolve()
        self.settings = DataSettings(
            tokenizer=self.config.tokenizer,
            tokenizer_path=self.config.tokenizer_path,
            vocab_size=self.config.vocab_size,
            jsonl_field=self.config.jsonl_field,
            val_fraction=self.config.val_fraction,
            max_chars=self.config.max_chars,
        )
        self._resolve()

        self._dir: Path | None = None
        self._key: str | None = None
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_sha256: str | None = None
        self._splits: dict[str, TokenFile] = {}
        self._resumed_state: dict[str, Any] | None = None

    # -- preparation -----------------------------------------------------------------------------

    def _resolve(self) -> list[SourceFile]:
        if self.config.name is not None:  # data=hf: one Hugging Face dataset split (mqa_lm.data.hf_data)
            from mqa_lm.data.hf_data import resolve_hf_source

            return [resolve_hf_source(self.config, self.cache_root)]
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
        files = self._resolve()
        # train() prepares before the Trainer, which calls this again: this object has just checked
        # the same data, so neither the token files nor the tokenizer are read and hashed twice.
        if self._key is not None and data_key(files, self.settings) == self._key:
            return
        key = data_key(files, self.settings)
        # Data too short for one window is found once the tokens exist: a directory made for it goes too.
        with discarded_on_error(self.cache_root, prepared_dir(self.cache_root, files, self.settings, key)):
            directory, key = prepare(files, self.settings, self.cache_root)
            for split in SPLITS:
                meta = read_json(split_paths(directory, split)[1])
                if meta is None:
                    raise ValueError(
                        f"data: the {split} token file in {directory} has no readable sidecar; delete {directory}"
                    )
                self._check_long_enough(split, meta["num_tokens"])
        if directory != self._dir:  # the sources changed since the last setup(): forget what it opened
            self._splits, self._tokenizer, self._tokenizer_sha256 = {}, None, None
        self._dir, self._key = directory, key

    def setup(self, stage: str | None = None) -> None:
        """Open the prepared tokenizer and both token files (every rank); needs :meth:`prepare_data` first.

        The token files are memory-mapped here, not at their first batch, so a run keeps reading them
        if the prepared directory is moved or deleted while it trains (the mapping holds the file).
        A missing or unusable directory is a ValueError starting ``data:`` that names it.
        """
        directory, key = self._locate()
        if self._splits and self._splits["train"].path.parent == directory:
            return  # already open (train.py sets up before the Trainer does)
        tokenizer_path = directory / "tokenizer.json"
        if not directory.is_dir():
            raise ValueError(
                f"data: the prepared data directory {directory} is missing; call prepare_data() first (train.py "
                "and Lightning do, on local rank 0), or again if it was moved or deleted since"
            )
        if not tokenizer_path.is_file():
            raise ValueError(
                f"data: {directory} holds no prepared tokenizer.json; call prepare_data() before setup() "
                "(Lightning does this on local rank 0)"
            )
        sha = file_sha256(tokenizer_path)
        for split in SPLITS:
            why = stale_reason(directory, split, key, sha)
            if why is not None:
                raise ValueError(
                    f"data: the prepared {split} split in {directory} is not usable ({why}); call prepare_data() "
                    "to rebuild it"
                )
        try:
            splits = {split: TokenFile.open(directory, split).map() for split in SPLITS}
        except OSError as err:
            raise ValueError(
                f"data: cannot open the prepared token files in {directory} ({err}); call prepare_data() "
                "to rebuild them"
            ) from None
        self._splits = splits
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
        ours = self._tokenizer_sha256 or "?"
        if theirs is not None and theirs != ours:
            raise ValueError(
                f"the checkpoint was trained with tokenizer sha256 {theirs[:12]}... but the prepared data in "
                f"{self._dir} uses {ours[:12]}...: its token ids mean different text. Resume "
                "with the original data settings (data.paths, data.tokenizer, data.vocab_size, ...) or start a new run"
            )
        changed = [
            f"{name} {saved[name]!r} -> {value!r}"
            for name, value in (
                ("seed", self.seed),
                ("block_size", self.block_size),
                ("batch_size", self.batch_size),
                ("key", self._key),
            )
            if name in saved and saved[name] != value
        ]
        if changed:
            warnings.warn(
                "resuming with different data settings than the checkpoint ("
                + "; ".join(changed)
                + "): training continues, but batches differ from the uninterrupted run",
                stacklevel=2,
            )
