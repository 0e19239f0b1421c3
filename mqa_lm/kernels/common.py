"""What every attention backend shares: the tensor contract, the mask algebra and the backend type.

Tensor contract (every backend): queries ``q`` [batch, heads, q_len, head_dim]; keys and values
``k``, ``v`` [batch, kv_heads, k_len, head_dim] with ``heads % kv_heads == 0`` (query head ``h``
reads K/V head ``h // (heads // kv_heads)``); ``bias`` already cropped and broadcastable to
[batch, heads, q_len, k_len]; ``key_padding_mask`` bool [batch, k_len], True = attend. ``causal``
is aligned bottom-right: query ``i`` sees key ``j`` iff ``j <= i + k_len - q_len``.

A query row that can see no key at all (its whole key padding masked) yields a zero output and zero
weights, in every backend, with finite gradients.
"""

from __future__ import annotations

import functools
import os

import torch


def triton_interpreting() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read as Triton
    does, when a kernel runs): tests pick small tiles and single configurations there."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Off only to measure what dependent launches gain (scripts/bench_generate.py).
DEPENDENT_LAUNCH = True
# Where a dependent-launch kernel lets the next one start: after its own wait (at most one kernel
# waits ahead of the running one), or before it (kernels cascade ahead). For measurements.
EARLY_TRIGGER = False


@functools.cache
def _properties(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def cuda_properties(device: torch.device) -> tuple[tuple[int, int], int]:
    """``((major, minor), multiprocessors)`` of the CUDA ``device``, asked once per card. A plain
    ``cuda`` device means the current one: its index is resolved before the cache is consulted, so a
    host with cards of two kinds never gets one card's answer for the other."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _properties(index)


def dependent_launch(device: torch.device) -> bool:
    """Whether the decode kernels on ``device`` launch as programmatic dependent launches (Hopper and
    later, not in the interpreter): each lets the next kernel in the stream start while it runs, and
    waits (``gdc_wait``) for the previous kernel's results before reading any activation. A decode
    step is a chain of kernels of a few microseconds each; without it every kernel's launch and
    first weight loads wait for the previous kernel's last store."""
    return (
        DEPENDENT_LAUNCH and device.type == "cuda" and not triton_interpreting() and cuda_properties(device)[0][0] >= 9
    )


def dependent_launch_mode(device: torch.device) -> int:
    """The decode kernels' ``GDC`` argument on ``device``: 0 a plain launch, 1 a dependent launch that
    lets the next kernel start before its own wait, 2 after it (see :func:`dependent_launch`)."""
    if not dependent_launch(device):
        return 0
    return 1 if EARLY_TRIGGER else 2


def allowed_keys(
    q_len: int, k_len: int, causal: bool, key_padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask broadcastable to [batch, 1, q_len, k_len] (True = may attend), or None if all may."""
    allowed = None
    if causal and q_len > 1:
        rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        allowed = torch.arange(k_len, device=device)[None, :] <= rows
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


def split_empty_rows(
    allowed: torch.Tensor | None, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return (``allowed`` with empty rows opened up, ``row_has_keys``) so softmax never sees an
    all -inf row; callers zero the empty rows' output with ``row_has_keys`` afterwards.

    Only key padding can empty a row (bottom-right causal always leaves a query its own key), and
    the check is done on the device, with no host synchronisation.
    """
    if allowed is None or key_padding_mask is None:
        return allowed, None
    row_has_keys = allowed.any(dim=-1, keepdim=True)
    return allowed | ~row_has_keys, row_has_keys


class AttentionBackend:
    """An attention implementation keyed by ``attn_impl``.

    Subclasses implement ``__call__`` (returns the context [batch, heads, q_len, head_dim]) and may
    say what they cannot do, at two levels, so the block asks each question as rarely as it can:

    - ``check_device`` / ``unsupported_on``: fixed for a device type and dtype; the block asks once
      per (device type, dtype) and caches the answer (a model can move devices or change dtype).
    - ``unsupported``: what varies from call to call (mask, bias, dropout, shapes); asked per call,
      and only if a backend overrides it.

    When either names a reason, the block runs the call on the ``torch`` backend instead and says
    why once when ``verbose >= 1``.
    """

    name: str = "?"

    def check_device(self, device: torch.device) -> None:
        """Raise ValueError if this backend can never run on ``device`` (checked before any work,
        whether or not the call needs weights)."""

    def unsupported_on(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run any call on ``device`` tensors of ``dtype``, or None."""
        return None

    def unsupported(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        causal: bool,
        bias: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
    ) -> str | None:
        return None

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        softmax_scale: float,
        causal: bool,
        bias: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        raise NotImplementedError
