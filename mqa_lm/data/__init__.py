"""Text data: sources -> tokenizer -> memory-mapped token files -> resumable (x, y) batches."""

from mqa_lm.data.config import DataConfig
from mqa_lm.data.datamodule import TextDataModule
from mqa_lm.data.datasets import ResumeSampler, TrainBatches, ValWindows, batch_seed
from mqa_lm.data.sources import STDLIB, resolve_sources, stdlib_files
from mqa_lm.data.store import TokenFile, token_dtype
from mqa_lm.data.tokenizer import EOT, UNK

__all__ = [
    "DataConfig",
    "EOT",
    "STDLIB",
    "UNK",
    "ResumeSampler",
    "TextDataModule",
    "TokenFile",
    "TrainBatches",
    "ValWindows",
    "batch_seed",
    "resolve_sources",
    "stdlib_files",
    "token_dtype",
]
