"""Cross-entropy of a linear head, computed in row chunks so the [N, vocab] logits never exist whole.

For a 50k vocabulary the fp32 logits of a 16 x 1024 batch take 3.3 GB, and autograd keeps them (or
their bf16 copy) for the backward. :func:`linear_cross_entropy` instead walks the rows in chunks: per
chunk it forms the logits in the input dtype, takes an fp32 log-softmax, and computes the gradients
with respect to the hidden states and the head weight right away (``softmax - onehot``), so the
backward only scales those stored gradients by the incoming one and recomputes nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from mqa_lm.utils.config import check_int


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, as
    ``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)``.

    Args:
        hidden: [N, d] floating point.
        weight: [V, d], same dtype and device as ``hidden`` (under autocast both are cast to the
            autocast dtype, as ``F.linear`` would).
        targets: [N] integer class ids; rows equal to ``ignore_index`` count for nothing.
        chunk_size: rows per chunk; peak extra memory is about ``chunk_size x V`` fp32 values.
        ignore_index: the target value of rows to skip.

    Returns:
        The fp32 (fp64 for fp64 input) mean over the rows not ignored; NaN when every row is
        ignored, as ``F.cross_entropy`` gives.
    """
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and hidden.is_floating_point()):
        raise ValueError(f"hidden must be a floating-point [N, d] tensor, got {_describe(hidden)}")
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == hidden.shape[1]):
        raise ValueError(f"weight must be [V, d={hidden.shape[1]}], got {_describe(weight)}")
    if not (
        isinstance(targets, torch.Tensor)
        and targets.dim() == 1
        and targets.shape[0] == hidden.shape[0]
        and not targets.is_floating_point()
    ):
        raise ValueError(f"targets must be integer class ids [N={hidden.shape[0]}], got {_describe(targets)}")
    check_int(chunk_size, "chunk_size")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype outside autocast")
    grad_enabled = torch.is_grad_enabled()
    want_hidden, want_weight = grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad
    if not (want_hidden or want_weight):
        # Evaluation: the loss alone (a Function's forward cannot tell that no gradient is wanted).
        return _chunked(hidden, weight, targets, chunk_size, ignore_index, False, False)[0]
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, want_hidden, want_weight)


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
        want_hidden: bool,
        want_weight: bool,
    ) -> torch.Tensor:
        # The autocast casts were done by linear_cross_entropy; inside, every matmul runs in the
        # input dtype.
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = _chunked(
                hidden, weight, targets, chunk_size, ignore_index, want_hidden, want_weight
            )
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight if grad_weight is not None else weight.new_empty(0),
        )
        ctx.wants = (want_hidden, want_weight)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        want_hidden, want_weight = ctx.wants
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if want_hidden else None
        grad_weight = grad_weight * grad_loss.to(grad_weight.dtype) if want_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    want_hidden: bool,
    want_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss, d loss / d hidden or None, d loss / d weight or None), chunk by chunk."""
    rows = hidden.shape[0]
    # fp32 softmax statistics for fp16/bf16/fp32 input; fp64 stays fp64.
    stat_dtype = torch.promote_types(hidden.dtype, torch.float32)
    valid = targets != ignore_index
    # Every row's gradient carries 1/count; folding it in now leaves the backward a single scale.
    # (A count of 0 gives inf * 0 = NaN gradients, matching F.cross_entropy's NaN loss.)
    inv_count = 1.0 / valid.sum().to(stat_dtype)
    total = torch.zeros((), dtype=stat_dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    # Summed over chunks in at least fp32, so a bf16 head does not lose the small chunks' terms.
    grad_weight = torch.zeros(weight.shape, dtype=stat_dtype, device=weight.device) if want_weight else None
    for start in range(0, rows, chunk_size):
        end = min(start + chunk_size, rows)
        h = hidden[start:end]
        logits = (h @ weight.t()).to(stat_dtype)
        keep = valid[start:end]
        picked = targets[start:end].clamp(0, weight.shape[0] - 1).masked_fill(~keep, 0)
        log_z = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(1, picked[:, None])[:, 0]
        total = total + torch.where(keep, log_z - target_logit, 0.0).sum()
        if want_hidden or want_weight:
            # d loss / d logits = (softmax - onehot) / count on kept rows, 0 on ignored ones, formed
            # in the logits' own buffer: one fp32 chunk alive at a time.
            grad_logits = logits.sub_(log_z[:, None]).exp_()
            grad_logits.scatter_add_(1, picked[:, None], torch.full_like(target_logit, -1.0)[:, None])
            grad_logits.mul_((keep.to(stat_dtype) * inv_count)[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.add_(grad_logits.t() @ h)
    return (
        total * inv_count,
        grad_hidden,
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
    )
