"""Scoring token sequences: the log-probability of the last tokens of each row given the ones before.

Both benchmark requests (a continuation after its context) and perplexity windows (the tokens of a
window not yet scored by an earlier one) reduce to one operation, :func:`score_tails`: rows of
``(inputs, targets)`` where ``targets`` are the tokens that follow the last ``len(targets)`` inputs.

How it is fast: rows are sorted by length and run ``batch_size`` at a time, right-padded, in one
forward each (causal attention: padding on the right changes no earlier position); the LM head and
the log-softmax run on the scored positions only, never on the whole [batch, seq, vocab]; and a
row whose inputs are a prefix of another row's (the same context with one-token continuations, a
multiple-choice question whose answers extend each other) is read off that row's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mqa_lm.utils.config import check_int

if TYPE_CHECKING:
    from mqa_lm.model import MQATransformer

# Rows per forward unless a caller says otherwise (perplexity, the harness model, eval.py's batch_size).
BATCH_SIZE = 16
# Scored positions per LM-head call: about 2**26 logits (256 MiB in fp32) whatever the vocabulary.
LOGITS_PER_CHUNK = 2**26


@dataclass(frozen=True)
class TailScore:
    """The score of one row's targets."""

    logprob: float  # summed log-probability of the targets, nats
    greedy: bool  # every target is the most likely token at its position


@dataclass(frozen=True)
class Window:
    """One sliding window over a token sequence ``ids``: inputs ``ids[begin:end]`` score the
    ``scored`` tokens ``ids[end - scored + 1 : end + 1]`` (the last positions of the window)."""

    begin: int
    end: int
    scored: int


def rolling_windows(length: int, first_target: int, window: int, stride: int) -> list[Window]:
    """The windows that score tokens ``first_target .. length - 1`` of a sequence, each exactly once.

    The first window is the first ``window`` tokens and scores all it can. Every later one scores the
    next ``stride`` tokens (fewer at the end) with the ``window`` tokens before its last one as
    inputs, so each of its tokens sees at least ``window - stride`` tokens of context and the last
    window has a full context. With ``stride = window`` these are lm-evaluation-harness's
    ``loglikelihood_rolling`` windows (disjoint predictions, the last one shifted back to a full
    window); a smaller stride gives every token more context for more compute.
    """
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if not 1 <= first_target <= window:
        raise ValueError(f"first_target must be in [1, window={window}], got {first_target}")
    if length <= first_target:
        return []
    end = min(window, length - 1)
    windows = [Window(0, end, end + 1 - first_target)]
    scored_until = end + 1
    while scored_until < length:
        end = min(scored_until + stride - 1, length - 1)
        windows.append(Window(max(0, end - window), end, end + 1 - scored_until))
        scored_until = end + 1
    return windows


def window_rows(ids: Sequence[int], windows: Sequence[Window]) -> list[tuple[list[int], list[int]]]:
    """``(inputs, targets)`` rows of ``windows`` over ``ids``, for :func:`score_tails`."""
    return [(list(ids[w.begin : w.end]), list(ids[w.end - w.scored + 1 : w.end + 1])) for w in windows]


def truncate_left(context: Sequence[int], continuation: Sequence[int], max_seq_len: int) -> tuple[list[int], list[int]]:
    """The ``(inputs, targets)`` row that scores ``continuation`` after ``context`` in at most
    ``max_seq_len`` positions: the last ``max_seq_len + 1`` tokens of context + continuation, less
    the very last (it is only predicted). This is lm-evaluation-harness's rule for decoder-only
    models, so the harness's HF backend scores the same tokens with the same context."""
    if not continuation:
        raise ValueError("the continuation is empty: there is nothing to score")
    if not context:
        raise ValueError("the context is empty: give at least one token (the document separator) to condition on")
    if len(continuation) > max_seq_len:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens is longer than max_seq_len={max_seq_len}; "
            "its first tokens would have no context"
        )
    whole = [*context, *continuation]
    return whole[-(max_seq_len + 1) :][:-1], list(continuation)


def _hosts(keys: list[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Each distinct input to the longest input it is a prefix of (itself when none): in sorted
    order the inputs that extend ``u`` come right after ``u``, so one backward pass finds them."""
    unique = sorted(set(keys))
    host: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i in range(len(unique) - 1, -1, -1):
        u = unique[i]
        after = unique[i + 1] if i + 1 < len(unique) else None
        host[u] = host[after] if after is not None and after[: len(u)] == u else u
    return host


@torch.no_grad()
def score_tails(
    model: MQATransformer,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[TailScore]:
    """The summed log-probability (and greediness) of each row's targets given its inputs.

    Row ``(inputs, targets)``: ``targets[j]`` is the token after ``inputs[len(inputs) - len(targets) + j]``,
    so ``targets[-1]`` follows the last input; ``1 <= len(targets) <= len(inputs) <= max_seq_len``.
    Log-softmax runs in fp32 (fp64 for an fp64 model) whatever the model's dtype. ``progress`` is
    called with the number of rows finished after each forward.
    """
    check_int(batch_size, "batch_size")
    limit = model.config.max_seq_len
    keys = []
    for inputs, targets in rows:
        if not 1 <= len(targets) <= len(inputs) <= limit:
            raise ValueError(
                f"a row needs 1 <= targets ({len(targets)}) <= inputs ({len(inputs)}) <= max_seq_len ({limit})"
            )
        keys.append(tuple(inputs))
    host = _hosts(keys)
    served: dict[tuple[int, ...], list[int]] = {}
    for i, key in enumerate(keys):
        served.setdefault(host[key], []).append(i)
    # Longest first: a batch's rows have similar lengths (little padding) and memory peaks at once.
    order = sorted(served, key=lambda h: (-len(h), h))
    device = model.wte.weight.device
    logprob = torch.zeros(len(rows), dtype=torch.float64)
    misses = torch.zeros(len(rows), dtype=torch.long)
    chunk = max(1, LOGITS_PER_CHUNK // model.config.vocab_size)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        where_row: list[int] = []
        where_pos: list[int] = []
        target: list[int] = []
        owner: list[int] = []
        for b, h in enumerate(batch):
            ids[b, : len(h)] = torch.tensor(h, dtype=torch.long)
            for i in served[h]:
                inputs, targets = rows[i]
                first = len(inputs) - len(targets)
                where_row += [b] * len(targets)
                where_pos += range(first, len(inputs))
                target += targets
                owner += [i] * len(targets)
        hidden = model.hidden_states(ids.to(device))
        rows_t = torch.tensor(where_row, device=device)
        pos_t = torch.tensor(where_pos, device=device)
        target_t = torch.tensor(target, device=device)
        for c in range(0, len(target), chunk):
            logits = model.lm_head(hidden[rows_t[c : c + chunk], pos_t[c : c + chunk]])
            logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            want = target_t[c : c + chunk]
            picked = logp.gather(1, want[:, None])[:, 0]
            owners = torch.tensor(owner[c : c + chunk])
            logprob.index_add_(0, owners, picked.double().cpu())
            misses.index_add_(0, owners, (logp.argmax(-1) != want).long().cpu())
        if progress is not None:
            progress(sum(len(served[h]) for h in batch))
    return [TailScore(float(lp), int(m) == 0) for lp, m in zip(logprob.tolist(), misses.tolist())]
