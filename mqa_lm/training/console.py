"""Known third-party console noise that says nothing about the run, silenced precisely.

Each filter matches one message, so every other warning and log line still shows.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's rank_zero_info goes through whichever of these modules set the shared logger last.
_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# An advert for a cloud logger, on every Trainer without one; and the note that our model summary
# (mqa_lm.training.callbacks.ModelSizeSummary) replaces Lightning's.
_NOISE = ("try installing [litlogger]", "Skipping setting a default `ModelSummary` callback")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOISE)


_FILTER = _DropNoise()


def quiet_known_noise() -> None:
    """Drop the litlogger tip and the "Skipping ... ModelSummary" note from Lightning's logs, torch's
    ``LeafSpec`` deprecation warning that Lightning's own pytree code triggers, and FSDP2's warning
    about our blocks' view outputs. Idempotent."""
    for name in _LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    # Raised inside lightning.pytorch.utilities._pytree (Lightning's to fix, nothing a user can do).
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # trainer=fsdp: a block returns its (key, value) as views of one projection; the model drops them
    # in training and never writes into a block's outputs, which is what the warning is about.
    warnings.filterwarnings(
        "ignore",
        message=r"FSDP2-wrapped module \(FSDP(Block|CheckpointWrapper)\) returned a view tensor",
        category=UserWarning,
    )
