"""Loss, perplexity and bits per byte of texts under a model, read in sliding windows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mqa_lm.evaluation.scoring import BATCH_SIZE, rolling_windows, score_tails, window_rows
from mqa_lm.inference.text import start_ids
from mqa_lm.utils.config import check_int
from mqa_lm.utils.files import read_text_utf8

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mqa_lm.model import MQATransformer


@dataclass
class Perplexity:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the texts
    nll: float  # summed negative log-likelihood, nats

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes


def check_window(max_seq_len: int, window: int | None) -> int:
    """``window`` (``max_seq_len`` when None); ValueError unless ``2 <= window <= max_seq_len``."""
    window = max_seq_len if window is None else window
    return check_int(window, "window", minimum=2, maximum=max_seq_len, hint=f"the model's max_seq_len is {max_seq_len}")


def check_stride(window: int, stride: int) -> int:
    """``stride``; ValueError unless ``1 <= stride <= window``."""
    return check_int(stride, "stride", maximum=window, hint=f"the window is {window} tokens")


def perplexity_windows(max_seq_len: int, window: int | None, stride: int | None) -> tuple[int, int]:
    """The ``(window, stride)`` :func:`perplexity` reads with: ``window`` defaults to
    ``max_seq_len``, ``stride`` to half a window; ValueError for values out of range."""
    window = check_window(max_seq_len, window)
    return window, check_stride(window, max(1, window // 2) if stride is None else stride)


def sequence_logprobs(
    model: MQATransformer, sequences: list[list[int]], first_target: int, *, window: int, stride: int, batch_size: int
) -> list[float]:
    """The summed log-probability of tokens ``first_target ..`` of each sequence, scored in
    :func:`~mqa_lm.evaluation.scoring.rolling_windows`; the windows of all sequences are batched
    together. Shared by :func:`perplexity` and the harness's ``loglikelihood_rolling``."""
    rows, owner = [], []
    for i, ids in enumerate(sequences):
        for row in window_rows(ids, rolling_windows(len(ids), first_target, window, stride)):
            rows.append(row)
            owner.append(i)
    totals = [0.0] * len(sequences)
    for i, score in zip(owner, score_tails(model, rows, batch_size=batch_size)):
        totals[i] += score.logprob
    return totals


def perplexity(
    model: MQATransformer,
    tokenizer: Tokenizer,
    texts: list[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = BATCH_SIZE,
) -> Perplexity:
    """Loss, perplexity and bits per byte of ``texts`` under ``model``.

    Each text is tokenised after the document separator (so its first token is scored too) and
    read in windows of ``window`` tokens (default ``max_seq_len``): the first scores all its
    tokens, each later one the next ``stride`` tokens (default half a window) with the ``window``
    tokens before the last of them as context, so every token is scored once and, after the first
    window, with at least ``window - stride`` tokens of context. ``stride = window`` is the
    harness's rolling windows. Raises ValueError when the texts hold no token to score.
    """
    window, stride = perplexity_windows(model.config.max_seq_len, window, stride)
    prefix = start_ids(tokenizer)
    sequences = [prefix + tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    tokens = sum(len(ids) - len(prefix) for ids in sequences)
    if tokens == 0:
        raise ValueError("the texts hold no token to score (they are empty); give text to measure")
    logprobs = sequence_logprobs(model, sequences, len(prefix), window=window, stride=stride, batch_size=batch_size)
    return Perplexity(tokens=tokens, bytes=sum(len(t.encode("utf-8")) for t in texts), nll=-sum(logprobs))


def read_text_file(path: str | Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); ValueError naming the file when
    it is missing or empty, :class:`~mqa_lm.utils.files.NotUTF8Error` (a ValueError, with the byte offset
    of the first invalid byte) when it is not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: there is no text to measure; remove it or add text")
    return read_text_utf8(path)
