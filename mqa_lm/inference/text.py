"""Text in, text out: batched prompts (left padding) and streamed continuations. Used by
``generate.py`` and the harness model (perplexity lives in :mod:`mqa_lm.evaluation`); independent of Hydra."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import torch

from mqa_lm.inference.engine import InferenceEngine, cache_length
from mqa_lm.inference.generate import generate

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mqa_lm.model import MQATransformer

EOT = "<|endoftext|>"


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
    """Prints one row's continuation as its tokens arrive. Byte-level BPE can split a character
    across tokens, so text ending in an incomplete character is held back until it completes."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout  # looked up now: stdout may be redirected
        self.ids: list[int] = []
        self.printed = 0

    def put(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


@torch.no_grad()
def generate_ids(
    model: MQATransformer,
    rows: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    attention: str = "auto",
    cuda_graph: bool | None = None,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
    chunk: int = 8,
) -> list[list[int]]:
    """The new token ids of every row (prompts of any lengths, batched with left padding).

    ``on_tokens`` gets each row's newest tokens every ``chunk`` steps (streaming). A row stops at
    ``eos_token_id`` (included). When a prompt plus its continuation exceeds ``max_seq_len``, rows
    run one at a time through :meth:`MQATransformer.generate`, which slides the context.
    """
    device = model.wte.weight.device
    limit = model.config.max_seq_len
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens - 1 > limit:
        results = []
        for row in rows:
            idx = torch.tensor([row], dtype=torch.long, device=device)
            out = generate(
                model,
                idx,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_token_id=eos_token_id,
                generator=generator,
            )[0, len(row) :].tolist()
            results.append(out)
            if on_tokens is not None:
                on_tokens([out])
        return [_cut_at(r, eos_token_id) for r in results]
    ids, mask = left_pad(rows, device)
    engine = InferenceEngine(
        model, len(rows), cache_length(longest + max_new_tokens - 1, limit), attention=attention, cuda_graph=cuda_graph
    )
    results = [[] for _ in rows]
    for piece in engine.stream(
        ids,
        max_new_tokens,
        prompt_mask=mask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        generator=generator,
        chunk=chunk,
    ):
        new = piece.tolist()
        fresh = []
        for row, tokens in zip(results, new):
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
