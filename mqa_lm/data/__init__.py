"""Text data without Lightning: sources -> tokenizer -> memory-mapped token files -> resumable batches.

* :mod:`~mqa_lm.data.config`: :class:`DataConfig`, every ``data.*`` setting, validated on construction;
* :mod:`~mqa_lm.data.sources`: files, directories, globs, ``.jsonl``/``.parquet``, URLs, ``stdlib``;
  :mod:`~mqa_lm.data.hf_data`: Hugging Face ``datasets`` (``data=hf``);
* :mod:`~mqa_lm.data.tokenizer`: byte-level BPE, characters or a file, and the end-of-text token;
* :mod:`~mqa_lm.data.prepare` and :mod:`~mqa_lm.data.store`: tokenized once into token files, cached;
* :mod:`~mqa_lm.data.datasets`: training windows and validation windows, resumable mid-epoch.

The Lightning datamodule that serves these to a Trainer is :class:`mqa_lm.training.TextDataModule`.
Names are imported on first use, so reading a tokenizer does not import the data preparation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqa_lm.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from mqa_lm.data.config import DataConfig
    from mqa_lm.data.datasets import ResumeSampler, TrainBatches, ValWindows, batch_seed
    from mqa_lm.data.sources import STDLIB, resolve_sources, stdlib_files
    from mqa_lm.data.store import TokenFile, token_dtype
    from mqa_lm.data.tokenizer import EOT, UNK

_EXPORTS = {
    "DataConfig": "mqa_lm.data.config",
    "ResumeSampler": "mqa_lm.data.datasets",
    "TrainBatches": "mqa_lm.data.datasets",
    "ValWindows": "mqa_lm.data.datasets",
    "batch_seed": "mqa_lm.data.datasets",
    "STDLIB": "mqa_lm.data.sources",
    "resolve_sources": "mqa_lm.data.sources",
    "stdlib_files": "mqa_lm.data.sources",
    "TokenFile": "mqa_lm.data.store",
    "token_dtype": "mqa_lm.data.store",
    "EOT": "mqa_lm.data.tokenizer",
    "UNK": "mqa_lm.data.tokenizer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "DataConfig",
    "EOT",
    "ResumeSampler",
    "STDLIB",
    "TokenFile",
    "TrainBatches",
    "UNK",
    "ValWindows",
    "batch_seed",
    "resolve_sources",
    "stdlib_files",
    "token_dtype",
]
