"""Launching the flash-attention kernels: autotuned configurations per head_dim and the host
functions :func:`attention_forward` / :func:`attention_backward` (shapes, strides, grids, the split of
the dK/dV rows). ``MQA_LM_TRITON_AUTOTUNE=0`` keeps each kernel's default configuration.
"""

from __future__ import annotations

import os
from typing import cast

import torch
import triton

from mqa_lm.kernels.common import cuda_properties
from mqa_lm.kernels.triton.attention_kernels import _attn_bwd, _attn_bwd_delta, _attn_fwd

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
AUTOTUNE_ENV = "MQA_LM_TRITON_AUTOTUNE"


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head_dim; the first entry is the default
# used when autotuning is off. Hopper wgmma wants the M of every product >= 64.
_FWD_CONFIGS: dict[int, list[tuple[int, ...]]] = {
    64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
    256: [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages): M1/N1 shape the dK/dV
# programs (rows, keys), M2/N2 the dQ programs. dK and dV accumulate in fp32 registers, so the
# key block shrinks or the warps grow with head_dim.
# The 64/128 lists keep the configurations that won MQA shapes on an H200 (docs/benchmarks.md);
# few candidates also keep the autotuner from picking a loser on timing noise. The 256 list was
# checked for register spills and its default for correctness on an H200, but not timed.
_BWD_CONFIGS: dict[int, list[tuple[int, ...]]] = {
    64: [(32, 128, 128, 32, 4, 4), (32, 64, 64, 32, 4, 4)],
    128: [(32, 128, 128, 32, 8, 3), (32, 128, 128, 64, 8, 3), (32, 64, 64, 32, 4, 4)],
    256: [(32, 64, 64, 32, 8, 2), (32, 32, 32, 32, 8, 2), (16, 32, 32, 16, 4, 2)],
}
# The interpreter runs one small configuration: several blocks in each direction even at tiny shapes.
_INTERPRET_FWD: tuple[int, ...] = (32, 16, 4, 1)
_INTERPRET_BWD: tuple[int, ...] = (16, 32, 32, 16, 4, 1)
_KEY = ["GROUP", "BLOCK_D", "CAUSAL", "HAS_BIAS", "HAS_MASK", "seq_bucket"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuning() -> bool:
    return not _interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _config_family(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


_KERNELS: dict[tuple[str, int, bool], triton.runtime.Autotuner] = {}


def _kernel(kind: str, block_d: int, tuned: bool) -> triton.runtime.Autotuner:
    """The autotuned launcher of ``kind`` ('fwd' or 'bwd') for a padded head_dim, built once.

    ``tuned=False`` (env ``MQA_LM_TRITON_AUTOTUNE=0``) keeps only the default configuration;
    the interpreter always runs its one small configuration.
    """
    family = _config_family(block_d)
    if (kind, family, tuned) not in _KERNELS:
        names: tuple[str, ...]
        small: tuple[int, ...]
        if kind == "fwd":
            names, table, small, fn = ("BLOCK_M", "BLOCK_N"), _FWD_CONFIGS, _INTERPRET_FWD, _attn_fwd
        else:
            names, table, small, fn = (
                ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"),
                _BWD_CONFIGS,
                _INTERPRET_BWD,
                _attn_bwd,
            )
        rows = [small] if _interpreting() else (table[family] if tuned else table[family][:1])
        configs = [
            triton.Config(dict(zip(names, row[: len(names)])), num_warps=row[-2], num_stages=row[-1]) for row in rows
        ]
        # Benchmarking a backward config runs it repeatedly: the atomic dK/dV sums must restart
        # from zero each time (and before the real launch that follows).
        reset = ["dK", "dV"] if kind == "bwd" else None
        _KERNELS[(kind, family, tuned)] = triton.autotune(configs=configs, key=_KEY, reset_to_zero=reset)(fn)
    return _KERNELS[(kind, family, tuned)]


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _seq_bucket(q_len: int, k_len: int) -> int:
    # Autotune per power-of-two length (capped at 16k and up), so decoding does not retune per token.
    return min(max(q_len, k_len, 1).bit_length(), 15)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias_strides(bias: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[int, ...]:
    if bias is None:
        return (0, 0, 0, 0)
    return tuple(bias.expand(shape).stride())  # broadcast dims get stride 0


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. Returns ``(out [b, h, q_len, d], lse)``; ``lse`` is the base-2
    log-sum-exp of the scaled scores per packed row, [b * kv_heads, q_len * group] fp32.

    ``out``/``lse`` may be given (any strides with a unit last stride) to be written in place.
    Inputs are assumed valid (see :func:`check_attention_inputs`).
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if out is None:
        out = torch.empty(batch, q_len, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    if lse is None:
        lse = torch.empty(batch * kv_heads, q_len * group, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    mask = _mask_arg(key_padding_mask)
    bias_strides = _bias_strides(bias, (batch, heads, q_len, k_len))
    block_d = _block_d(head_dim)
    kernel = _kernel("fwd", block_d, _autotuning())
    batch_kv = batch * kv_heads
    n_rows = q_len * group

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * batch_kv,)

    kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        bias,
        mask,
        softmax_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        *bias_strides,
        mask.stride(0) if mask is not None else 0,
        batch_kv,
        kv_heads,
        q_len,
        k_len,
        _seq_bucket(q_len, k_len),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        CAUSAL=bool(causal),
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
    )
    return out, lse


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    kv_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels for ``out, lse = attention_forward(...)``; returns (dq, dk, dv).

    ``dk``/``dv`` [b, kv_heads, k_len, d] hold the sums over each K/V head's query heads. Output
    buffers may be given (unit last stride) to be written in place; dk and dv allocated here are two
    views of one buffer. ``kv_splits`` (default: picked
    from the shape and the multiprocessor count) is how many programs share the packed query rows
    of one key block; above 1 their fp32 partial sums are added atomically.
    """
    q, k, v, out, grad_out = (_unit_last(t) for t in (q, k, v, out, grad_out))
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    batch_kv = batch * kv_heads
    n_rows = q_len * group
    empty = q.numel() == 0 or k.numel() == 0
    atomic = False
    if not empty:
        if kv_splits is None:
            kv_splits = _default_kv_splits(q.device, batch_kv, k_len, n_rows)
        kv_chunk = triton.cdiv(triton.cdiv(n_rows, max(kv_splits, 1)), _CHUNK_ALIGN) * _CHUNK_ALIGN
        n_chunks = triton.cdiv(n_rows, kv_chunk)
        atomic = n_chunks > 1
    if dq is None:
        dq = torch.empty(batch, q_len, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)
    # dK and dV we allocate ourselves share one [2, b, k_len, kv_heads, d] buffer, so the atomic
    # path zeroes one fp32 buffer and converts it once: every torch op costs host time.
    kv_shape = (2, batch, k_len, kv_heads, head_dim)
    if dk is None and dv is None:
        if not atomic:
            dk, dv = torch.empty(kv_shape, device=k.device, dtype=k.dtype).transpose(2, 3).unbind(0)
    else:
        if dk is None:
            dk = torch.empty(batch, k_len, kv_heads, head_dim, device=k.device, dtype=k.dtype).transpose(1, 2)
        if dv is None:
            dv = torch.empty(batch, k_len, kv_heads, head_dim, device=v.device, dtype=v.dtype).transpose(1, 2)
    # Off the atomic path (always when empty) dk and dv are allocated by now; on it, after the launch.
    if empty:
        return dq.zero_(), cast(torch.Tensor, dk).zero_(), cast(torch.Tensor, dv).zero_()
    mask = _mask_arg(key_padding_mask)
    bias_strides = _bias_strides(bias, (batch, heads, q_len, k_len))
    block_d = _block_d(head_dim)

    delta = torch.empty_like(lse)
    delta_rows = 64
    _attn_bwd_delta[(triton.cdiv(n_rows, delta_rows), batch_kv)](
        out,
        grad_out,
        delta,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        kv_heads,
        q_len,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=delta_rows,
    )

    kernel = _kernel("bwd", block_d, _autotuning())
    if atomic:
        acc = torch.zeros(kv_shape, device=k.device, dtype=torch.float32).transpose(2, 3)
        dk_acc, dv_acc = acc.unbind(0)
    else:
        dk_acc, dv_acc = cast(torch.Tensor, dk), cast(torch.Tensor, dv)

    def grid(meta):
        kv_programs = triton.cdiv(k_len, meta["BLOCK_N1"]) * batch_kv * n_chunks
        return (kv_programs + triton.cdiv(n_rows, meta["BLOCK_M2"]) * batch_kv,)

    kernel[grid](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        dk_acc,
        dv_acc,
        bias,
        mask,
        softmax_scale * LOG2E,
        softmax_scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        dk_acc.stride(0),
        dk_acc.stride(1),
        dk_acc.stride(2),
        dv_acc.stride(0),
        dv_acc.stride(1),
        dv_acc.stride(2),
        *bias_strides,
        mask.stride(0) if mask is not None else 0,
        batch_kv,
        kv_heads,
        q_len,
        k_len,
        _seq_bucket(q_len, k_len),
        kv_chunk,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        CAUSAL=bool(causal),
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        KV_ATOMIC=atomic,
    )
    if atomic:
        if dk is None:
            dk, dv = acc.to(k.dtype).unbind(0)
        else:
            dk.copy_(dk_acc)
            cast(torch.Tensor, dv).copy_(dv_acc)
    return dq, cast(torch.Tensor, dk), cast(torch.Tensor, dv)


# Row chunks are whole multiples of every BLOCK_M1, so phase boundaries stay block-aligned.
_CHUNK_ALIGN = 128


def _default_kv_splits(device: torch.device, batch_kv: int, k_len: int, n_rows: int) -> int:
    """Split each key block's rows until the dK/dV programs number about four per multiprocessor,
    keeping every chunk at least 2048 rows long so the atomic adds stay rare."""
    sms = cuda_properties(device)[1] if device.type == "cuda" else 4
    kv_programs = triton.cdiv(k_len, 128) * batch_kv
    wanted = triton.cdiv(4 * sms, kv_programs)
    return max(1, min(wanted, n_rows // 2048))


def _mask_arg(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    mask = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
    mask = _unit_last(mask)
    return mask.view(torch.uint8)
