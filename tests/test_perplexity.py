"""mqa_lm.evaluation.scoring and .perplexity: the sliding windows (against lm-eval's own rolling
windows), the batched scorer (against one float64 forward per row), and perplexity against a
per-token computation from the definition."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import model_for

from mqa_lm.data.tokenizer import build_char
from mqa_lm.evaluation.perplexity import perplexity, read_text_file
from mqa_lm.evaluation.scoring import rolling_windows, score_tails, truncate_left, window_rows
from mqa_lm.inference.text import start_ids

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 2


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ---- windows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [2, 3, 7, 16])
def test_stride_of_a_whole_window_gives_the_harness_rolling_windows(window):
    utils = pytest.importorskip("lm_eval.utils")
    prefix = 99
    for n in range(0, 40):
        tokens = list(range(n))
        ids = [prefix, *tokens]
        ours = window_rows(ids, rolling_windows(len(ids), 1, window, window))
        theirs = [
            utils.make_disjoint_window(pair)
            for pair in utils.get_rolling_token_windows(tokens, prefix, max_seq_len=window, context_len=1)
        ]
        # The harness splits each window into (context, continuation); ours is (inputs, scored targets).
        assert [(x, y) for x, y in ours] == [(ctx + cont[:-1], cont) for ctx, cont in theirs], (n, window)


@pytest.mark.parametrize("length,window,stride", [(50, 16, 16), (50, 16, 5), (50, 8, 1), (9, 8, 3), (17, 16, 16)])
def test_windows_score_every_token_once_with_the_promised_context(length, window, stride):
    windows = rolling_windows(length, 1, window, stride)
    scored = [j for w in windows for j in range(w.end - w.scored + 1, w.end + 1)]
    assert scored == list(range(1, length))
    for i, w in enumerate(windows):
        assert 0 <= w.begin < w.end <= length - 1 and w.end - w.begin <= window
        if i > 0:
            assert w.scored <= stride
            # the first token it scores sees at least window - stride tokens before it
            assert (w.end - w.scored + 1) - w.begin >= min(window - stride + 1, w.end - w.scored + 1)
    assert windows[-1].end == length - 1


# ---- the scorer ---------------------------------------------------------------------------------


def one_forward_per_row(model, inputs, targets):
    """float64 log-probability of ``targets`` after ``inputs`` by a forward of exactly that row."""
    logits, _ = model(torch.tensor([inputs]))
    logp = F.log_softmax(logits[0].double(), -1)
    first = len(inputs) - len(targets)
    picked = [logp[first + j, t].item() for j, t in enumerate(targets)]
    greedy = all(logp[first + j].argmax().item() == t for j, t in enumerate(targets))
    return sum(picked), greedy


def test_batched_scores_equal_one_forward_per_row():
    model = model_for(40, max_seq_len=16)
    gen = torch.Generator().manual_seed(3)
    context = torch.randint(0, 40, (9,), generator=gen).tolist()
    rows = [
        (context, context[-1:]),  # identical inputs: one forward serves both
        (context, [5]),
        (context + [5, 6], [5, 6, 7]),  # extends the rows above: they are read off its forward
        (context[:4], context[2:4] + [8]),
        (torch.randint(0, 40, (16,), generator=gen).tolist(), [1] * 16),
        ([3], [4]),
    ]
    for batch_size in (1, 2, 16):
        got = score_tails(model, rows, batch_size=batch_size)
        for (inputs, targets), score in zip(rows, got):
            want, greedy = one_forward_per_row(model, inputs, targets)
            assert math.isclose(score.logprob, want, rel_tol=1e-12, abs_tol=1e-12)
            assert score.greedy == greedy


def test_a_greedy_continuation_is_reported_greedy():
    model = model_for(40, max_seq_len=16)
    inputs = [1, 2, 3]
    logits, _ = model(torch.tensor([inputs]))
    best = int(logits[0, -1].argmax())
    (hit, miss) = score_tails(model, [(inputs, [best]), (inputs, [(best + 1) % 40])], batch_size=2)
    assert hit.greedy and not miss.greedy and hit.logprob > miss.logprob


def test_truncation_keeps_the_last_max_seq_len_plus_one_tokens():
    context, continuation = list(range(100, 130)), [1, 2, 3]
    inputs, targets = truncate_left(context, continuation, 16)
    assert inputs == (context + continuation)[-17:-1] and targets == continuation
    assert truncate_left([7], [8, 9], 16) == ([7, 8], [8, 9])
    with pytest.raises(ValueError, match="longer than max_seq_len=16"):
        truncate_left([1], list(range(17)), 16)
    with pytest.raises(ValueError, match="context is empty"):
        truncate_left([], [1], 16)


def test_bad_rows_are_refused():
    model = model_for(40, max_seq_len=16)
    with pytest.raises(ValueError, match=r"1 <= targets \(3\) <= inputs \(2\)"):
        score_tails(model, [([1, 2], [3, 4, 5])], batch_size=1)
    with pytest.raises(ValueError, match="max_seq_len \\(16\\)"):
        score_tails(model, [(list(range(17)), [1])], batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        score_tails(model, [([1], [2])], batch_size=0)


# ---- perplexity ---------------------------------------------------------------------------------


def reference_nll(model, ids, first_target, window, stride):
    """Per target token j: its log-probability given the context the docstring of perplexity()
    promises, by one forward of exactly that context per token: the first window's tokens see
    everything before them; each later group of ``stride`` tokens sees the ``window`` tokens before
    the group's last token."""
    nll, count = 0.0, 0
    groups = [list(range(first_target, min(window, len(ids) - 1) + 1))]
    while groups[-1] and groups[-1][-1] < len(ids) - 1:
        start = groups[-1][-1] + 1
        groups.append(list(range(start, min(start + stride, len(ids)))))
    for g, group in enumerate(groups):
        for j in group:
            begin = 0 if g == 0 else max(0, group[-1] - window)
            logits, _ = model(torch.tensor([ids[begin:j]]))
            nll -= F.log_softmax(logits[0, -1].double(), -1)[ids[j]].item()
            count += 1
    return nll, count


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (8, 1), (8, 3)])
def test_perplexity_matches_per_token_definition(window, stride):
    tokenizer = build_char([TEXT])
    model = model_for(tokenizer.get_vocab_size(), max_seq_len=16)
    texts = [TEXT[:70], TEXT[70:95]]
    got = perplexity(model, tokenizer, texts, window=window, stride=stride, batch_size=3)
    want_nll, want_count = 0.0, 0
    for text in texts:
        ids = start_ids(tokenizer) + tokenizer.encode(text, add_special_tokens=False).ids
        nll, count = reference_nll(model, ids, 1, window, stride)
        want_nll += nll
        want_count += count
    assert got.tokens == want_count == 95  # every character scored once
    assert got.bytes == 95
    assert math.isclose(got.nll, want_nll, rel_tol=1e-9)
    assert math.isclose(got.bits_per_byte, want_nll / math.log(2) / 95, rel_tol=1e-9)
    assert math.isclose(got.perplexity, math.exp(want_nll / 95), rel_tol=1e-9)


def test_perplexity_rejects_bad_windows_and_no_text():
    tokenizer = build_char([TEXT])
    model = model_for(tokenizer.get_vocab_size(), max_seq_len=16)
    with pytest.raises(
        ValueError, match=r"window must be an integer in \[2, 16\], got 17; the model's max_seq_len is 16"
    ):
        perplexity(model, tokenizer, [TEXT], window=17)
    with pytest.raises(ValueError, match=r"stride must be an integer in \[1, 8\], got 9; the window is 8 tokens"):
        perplexity(model, tokenizer, [TEXT], window=8, stride=9)
    with pytest.raises(ValueError, match="no token to score"):
        perplexity(model, tokenizer, ["", ""])


def test_text_files_must_be_utf8_and_not_empty(tmp_path: Path):
    good = tmp_path / "good.txt"
    good.write_text("héllo\n", encoding="utf-8")
    assert read_text_file(good) == "héllo\n"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        read_text_file(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("abc café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin}: not UTF-8 at byte 7 \\(invalid continuation byte\\)"):
        read_text_file(latin)
