"""Token sampling on the device with no host synchronisation and no RNG inside the step.

The random numbers are drawn up front (one uniform per row and step, from the caller's
``torch.Generator``), and a token is picked by inverting the cumulative distribution: a CUDA graph
can replay the step with no generator state to track, and a given generator seed gives the same
tokens eagerly and under the graph.
"""

from __future__ import annotations

import torch


def sample_with_uniform(
    logits: torch.Tensor,
    uniform: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [batch, vocab] from ``uniform`` [batch] in [0, 1).

    Temperature 0 is greedy;
    ``top_k`` keeps the k likeliest tokens; ``top_p`` keeps the smallest set whose probability
    reaches p (a token is dropped when the tokens before it already reach p; the first stays).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    nucleus = top_p is not None and top_p < 1.0
    index = None
    if top_k is not None and top_k < vocab:
        logits, index = torch.topk(logits, top_k, dim=-1)  # sorted, as top-p needs
    elif nucleus:
        logits, index = torch.sort(logits, descending=True, dim=-1)
    probs = logits.softmax(dim=-1)
    if nucleus and top_p is not None:  # the second test only narrows top_p: nucleus implies it
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    # A token with zero probability has the same cdf as the one before it, so it is never the
    # first entry above the threshold.
    threshold = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, threshold, right=True).clamp_max(cdf.shape[-1] - 1)
    if index is not None:
        choice = index.gather(-1, choice)
    return choice[:, 0]
