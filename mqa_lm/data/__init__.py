"""Text data: sources -> tokenizer -> memory-mapped token files -> resumable (x, y) batches.

Names are imported on first use (PEP 562): reading a tokenizer or a token file (``mqa_lm.data.tokenizer``,
``mqa_lm.data.store``) must not import Lightning, which only :class:`TextDataModule` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataConfig": "config",
    "TextDataModule": "datamodule",
    "ResumeSampler": "datasets",
    "TrainBatches": "datasets",
    "ValWindows": "datasets",
    "batch_seed": "datasets",
    "STDLIB": "sources",
    "resolve_sources": "sources",
    "stdlib_files": "sources",
    "TokenFile": "store",
    "token_dtype": "store",
    "EOT": "tokenizer",
    "UNK": "tokenizer",
}

if TYPE_CHECKING:
    from mqa_lm.data.config import DataConfig
    from mqa_lm.data.datamodule import TextDataModule
    from mqa_lm.data.datasets import ResumeSampler, TrainBatches, ValWindows, batch_seed
    from mqa_lm.data.sources import STDLIB, resolve_sources, stdlib_files
    from mqa_lm.data.store import TokenFile, token_dtype
    from mqa_lm.data.tokenizer import EOT, UNK


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mqa_lm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mqa_lm.data.{module}"), name)


__all__ = sorted(_EXPORTS)
