"""Text in, text out: batched prompts (left padding) and streamed continuations. Used by
``generate.py`` and the harness model (perplexity lives in :mod:`mqa_lm.evaluation`); independent of Hydra."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import torch

from mqa_lm.data.tokenizer import EOT
from mqa_lm.inference.config import GenerationConfig
from mqa_lm.inference.engine import STREAM_CHUNK, InferenceEngine, cache_length

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mqa_lm.model import MQATransformer


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt, and the context before a text's first token, is: the document
    separator the model was trained with (``<|endoftext|>``, else a blank line)."""
    eot = tokenizer.token_to_id(EOT)
    if eot is not None:
        return [eot]
    return tokenizer.encode("\n\n", add_special_tokens=False).ids or [0]


def left_pad(rows: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (ids [batch, longest], mask [batch, longest]); the padding
    (id 0, mask False) is on the left so every row's last token is in the last column."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = True
    return ids.to(device), mask.to(device)


class TextStreamer:
    """Prints one row's continuation as its tokens arrive, decoding only what is new.

    Byte-level BPE can split a character across tokens, so text ending in an incomplete character is
    held back until it completes. New tokens are decoded after a few already printed ones (their
    text subtracted), so a decoder that treats a sequence's first token specially still joins pieces
    as it would the whole row, and each chunk costs the same however long the row grows.
    """

    CONTEXT = 4  # printed tokens decoded again before the new ones

    def __init__(self, tokenizer: Tokenizer, out: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout  # looked up now: stdout may be redirected
        self.printed: list[int] = []  # the last CONTEXT tokens already printed
        self.pending: list[int] = []  # tokens whose text is not printed yet

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _new_text(self) -> str:
        context = self._decode(self.printed)
        return self._decode(self.printed + self.pending)[len(context) :]

    def put(self, ids: list[int]) -> None:
        self.pending.extend(ids)
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return
        self.out.write(text)
        self.out.flush()
        self.printed = (self.printed + self.pending)[-self.CONTEXT :]
        self.pending = []

    def end(self) -> None:
        self.out.write(self._new_text() + "\n")
        self.out.flush()
        self.printed, self.pending = [], []


@torch.no_grad()
def generate_ids(
    model: MQATransformer,
    rows: list[list[int]],
    config: GenerationConfig,
    *,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    attention: str = "auto",
    cuda_graph: bool | None = None,
    compile: bool | str = False,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
    chunk: int = STREAM_CHUNK,
) -> list[list[int]]:
    """The new token ids of every row (prompts of any lengths, batched with left padding, on one
    :class:`InferenceEngine`).

    ``config`` gives ``max_new_tokens``, the sampling settings and ``context_overflow`` (past
    ``max_seq_len`` the rows stay batched and it decides; see :func:`mqa_lm.inference.generation`).
    ``on_tokens`` gets each row's newest tokens every ``chunk`` steps (streaming). A row stops at
    ``eos_token_id`` (included).
    """
    longest = max(len(r) for r in rows)
    ids, mask = left_pad(rows, "cpu")  # the engine takes a prompt from the host (see InferenceEngine.stream)
    engine = InferenceEngine(
        model,
        len(rows),
        cache_length(longest + config.max_new_tokens - 1, model.config.max_seq_len),
        attention=attention,
        cuda_graph=cuda_graph,
        compile=compile,
    )
    results: list[list[int]] = [[] for _ in rows]
    for piece in engine.stream(
        ids, config, prompt_mask=mask, eos_token_id=eos_token_id, generator=generator, chunk=chunk
    ):
        fresh = []
        for row, tokens in zip(results, piece.tolist()):
            # Past its end-of-sequence a row only repeats it: nothing to show.
            done = eos_token_id is not None and eos_token_id in row
            fresh.append([] if done else _cut_at(tokens, eos_token_id))
            row.extend(fresh[-1])
        if on_tokens is not None:
            on_tokens(fresh)
    return results


def _cut_at(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens
