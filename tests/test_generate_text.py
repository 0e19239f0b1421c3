"""mqa_lm.inference.text: batched generation from token rows and streaming (the sliding-window
perplexity is tested in tests/test_perplexity.py)."""

from __future__ import annotations

import io

import pytest
import torch
from model_helpers import model_for

from mqa_lm.data.tokenizer import train_bpe
from mqa_lm.inference.config import GenerationConfig
from mqa_lm.inference.text import TextStreamer, generate_ids, left_pad


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@torch.no_grad()
def naive_greedy(model, row, n):
    """Greedy tokens from full forwards of the last max_seq_len tokens (nanoGPT's loop)."""
    ids = torch.tensor([row])
    for _ in range(n):
        logits, _ = model(ids[:, -model.config.max_seq_len :])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(row) :].tolist()


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [9]], "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_rows_of_different_lengths_equal_each_row_alone(pos_emb):
    model = model_for(40, max_seq_len=48, pos_emb=pos_emb)
    rows = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    streamed = [[] for _ in rows]

    def collect(fresh):
        for acc, new in zip(streamed, fresh):
            acc.extend(new)

    got = generate_ids(model, rows, GenerationConfig(20, temperature=0.0), on_tokens=collect, chunk=3)
    assert got == streamed
    for row, new in zip(rows, got):
        assert new == naive_greedy(model, row, 20)


def test_rows_stop_at_eos_and_long_rows_slide():
    model = model_for(40, max_seq_len=16)
    rows = [[1, 2, 3], [4, 5]]
    free = generate_ids(model, rows, GenerationConfig(10, temperature=0.0))
    eos = free[0][4]
    got = generate_ids(model, rows, GenerationConfig(10, temperature=0.0), eos_token_id=eos)
    assert got[0] == free[0][: free[0].index(eos) + 1]
    if eos in free[1]:
        assert got[1] == free[1][: free[1].index(eos) + 1]
    else:
        assert got[1] == free[1]
    # 3 + 20 tokens exceed max_seq_len=16: the rows stay batched, and crop gives each its last window.
    long = generate_ids(model, rows, GenerationConfig(20, temperature=0.0, context_overflow="crop"))
    for row, new in zip(rows, long):
        assert new == naive_greedy(model, row, 20)


def test_streamer_never_prints_half_a_character():
    tokenizer = train_bpe(["héllo wörld ünïcödé " * 20], vocab_size=300)
    text = "wörld ünïcödé héllo"
    ids = tokenizer.encode(text).ids
    out = io.StringIO()
    streamer = TextStreamer(tokenizer, out)
    seen = []
    for token in ids:
        streamer.put([token])
        seen.append(out.getvalue())
    streamer.end()
    assert all("\ufffd" not in s for s in seen)
    assert out.getvalue() == text + "\n"
