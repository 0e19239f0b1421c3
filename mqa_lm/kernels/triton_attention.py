"""Flash attention for MQA/GQA in Triton: forward, backward, and a ``torch.library`` custom op.

Layout: queries ``q`` [batch, heads, q_len, head_dim]; keys/values [batch, kv_heads, k_len, head_dim]
(any strides with a unit last stride). The ``group = heads // kv_heads`` query heads that share one
K/V head are *packed* into the M dimension of a tile: packed row ``r`` of K/V head ``kvh`` is query
position ``r // group`` of head ``kvh * group + r % group``. Every K/V tile a program loads therefore
serves all the heads that read it, and for decoding (``q_len == 1``) one tile holds every head.

Backward is one launch with two kinds of program, so the short dQ programs fill the multiprocessors
that the long dK/dV programs leave idle (their lengths differ widely under causal masking):

* dK/dV programs own a block of keys of one K/V head and walk the packed query rows of it, so the
  gradient of a shared K/V head sums over its query heads in fp32 registers; nothing per query head
  is written out. MQA has few key blocks (one K/V head), so when they would not fill the GPU the
  rows are split into chunks whose fp32 partial sums meet through one atomic add per program
  (``kv_splits``); the summation order then varies from run to run in the last bits.
* dQ programs own a block of packed query rows and walk the keys (recomputing the scores, which
  costs two extra products but needs no atomics on dQ).

The scores are kept in base 2 (``log2(e)`` folded into the scale) so the softmax uses ``exp2``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import cast

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
AUTOTUNE_ENV = "MQA_LM_TRITON_AUTOTUNE"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, head, pos, row_ok, stride_h, stride_m, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Packed query rows [rows, BLOCK_D]; rows past the end and padded head dims read as 0."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + head[:, None] * stride_h + pos[:, None] * stride_m + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_rows_t(base, head, pos, row_ok, stride_h, stride_m, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The same rows transposed, [BLOCK_D, rows]."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + head[None, :] * stride_h + pos[None, :] * stride_m + offs_d[:, None]
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs, mask=row_ok[None, :], other=0.0)
    return tl.load(ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(base, val, head, pos, row_ok, stride_h, stride_m, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + head[:, None] * stride_h + pos[:, None] * stride_m + offs_d[None, :]
    val = val.to(base.dtype.element_ty)
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, val, mask=row_ok[:, None])
    else:
        tl.store(ptrs, val, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _load_keys(base, keys, stride_n, seq_k, BOUNDED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """K or V rows [keys, BLOCK_D]; ``BOUNDED`` masks keys past ``seq_k`` (only a last block needs it)."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + keys[:, None] * stride_n + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        if BOUNDED:
            return tl.load(ptrs, mask=(keys < seq_k)[:, None], other=0.0)
        return tl.load(ptrs)
    if BOUNDED:
        return tl.load(ptrs, mask=(keys < seq_k)[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return tl.load(ptrs, mask=(offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_keys_t(base, keys, stride_n, seq_k, BOUNDED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """K or V rows transposed, [BLOCK_D, keys]."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + keys[None, :] * stride_n + offs_d[:, None]
    if BLOCK_D == HEAD_DIM:
        if BOUNDED:
            return tl.load(ptrs, mask=(keys < seq_k)[None, :], other=0.0)
        return tl.load(ptrs)
    if BOUNDED:
        return tl.load(ptrs, mask=(keys < seq_k)[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    return tl.load(ptrs, mask=(offs_d[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _packed_rows(rows, kvh, n_rows, GROUP: tl.constexpr):
    """Query position, query head and in-range flag of packed rows ``rows`` of K/V head ``kvh``."""
    return rows // GROUP, kvh * GROUP + rows % GROUP, rows < n_rows


@triton.jit
def _row_block(pid, n_rows, batch_kv, kv_heads, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The (batch, K/V head) and the block of packed rows that program ``pid`` owns.

    Consecutive programs take the same row block of every (batch, kv head); the last row blocks,
    the longest under causal masking, start first so the short ones fill the tail.
    """
    n_m = tl.cdiv(n_rows, BLOCK_M)
    bh = pid % batch_kv
    m_block = n_m - 1 - pid // batch_kv
    b = (bh // kv_heads).to(tl.int64)
    kvh = bh % kv_heads
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    pos, head, row_ok = _packed_rows(rows, kvh, n_rows, GROUP)
    return bh, b, kvh, m_block, rows, pos, head, row_ok


@triton.jit
def _bias_tile(bias_base, head, pos, keys, row_ok, seq_k, stride_bh, stride_bm, stride_bn):
    """Additive bias [rows, keys] in fp32, scaled to base 2; broadcast dims have stride 0."""
    ptrs = bias_base + head[:, None] * stride_bh + pos[:, None] * stride_bm + keys[None, :] * stride_bn
    bias = tl.load(ptrs, mask=row_ok[:, None] & (keys < seq_k)[None, :], other=0.0)
    return bias.to(tl.float32) * 1.4426950408889634


@triton.jit
def _causal_ranges(first_row, last_row, seq_q, seq_k, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range [0, hi) that packed rows [first_row, last_row] may see, and the prefix [0, full)
    of whole blocks that every one of them sees (no mask needed there)."""
    if CAUSAL:
        shift = seq_k - seq_q
        last_pos = tl.minimum(last_row // GROUP, seq_q - 1)
        hi = tl.maximum(tl.minimum(seq_k, last_pos + shift + 1), 0)
        full = tl.maximum(tl.minimum(first_row // GROUP + shift + 1, hi), 0)
    else:
        hi = seq_k
        full = seq_k
    full = (full // BLOCK_N) * BLOCK_N
    return hi, full


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    bias_base,
    mask_base,
    head,
    pos,
    row_ok,
    lo,
    hi,
    qk_scale,
    seq_k,
    shift,
    stride_kn,
    stride_vn,
    stride_bh,
    stride_bm,
    stride_bn,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        k = _load_keys(k_base, keys, stride_kn, seq_k, MASKED, HEAD_DIM, BLOCK_D)
        qk = tl.dot(q, tl.trans(k))
        # Without a bias the scale is folded into the exponent's multiply-add (one op less per score).
        if HAS_BIAS:
            qk = qk * qk_scale + _bias_tile(bias_base, head, pos, keys, row_ok, seq_k, stride_bh, stride_bm, stride_bn)
            scale = 1.0
        else:
            scale = qk_scale
        if MASKED:
            ok = (keys < seq_k)[None, :]
            if CAUSAL:
                ok = ok & (keys[None, :] <= pos[:, None] + shift)
            qk = tl.where(ok, qk, float("-inf"))
        if HAS_MASK:
            attend = tl.load(mask_base + keys, mask=keys < seq_k, other=0)
            qk = tl.where((attend != 0)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
        # A row that has seen no key yet keeps max -inf; subtracting 0 instead keeps exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_keys(v_base, keys, stride_vn, seq_k, MASKED, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    Bias,
    KeyMask,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_mb,
    batch_kv,
    kv_heads,
    seq_q,
    seq_k,
    seq_bucket,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    n_rows = seq_q * GROUP
    bh, b, kvh, m_block, rows, pos, head, row_ok = _row_block(
        tl.program_id(0), n_rows, batch_kv, kv_heads, GROUP, BLOCK_M
    )
    q = _load_rows(Q + b * stride_qb, head, pos, row_ok, stride_qh, stride_qm, HEAD_DIM, BLOCK_D)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    bias_base = Bias  # None when absent: only read under HAS_BIAS
    if HAS_BIAS:
        bias_base = Bias + b * stride_bb
    mask_base = KeyMask  # None when absent: only read under HAS_MASK
    if HAS_MASK:
        mask_base = KeyMask + b * stride_mb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi, full = _causal_ranges(m_block * BLOCK_M, m_block * BLOCK_M + BLOCK_M - 1, seq_q, seq_k, GROUP, CAUSAL, BLOCK_N)
    shift = seq_k - seq_q
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        bias_base,
        mask_base,
        head,
        pos,
        row_ok,
        0,
        full,
        qk_scale,
        seq_k,
        shift,
        stride_kn,
        stride_vn,
        stride_bh,
        stride_bm,
        stride_bn,
        False,
        CAUSAL,
        HAS_BIAS,
        HAS_MASK,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        bias_base,
        mask_base,
        head,
        pos,
        row_ok,
        full,
        hi,
        qk_scale,
        seq_k,
        shift,
        stride_kn,
        stride_vn,
        stride_bh,
        stride_bm,
        stride_bn,
        True,
        CAUSAL,
        HAS_BIAS,
        HAS_MASK,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
    )

    # A row that saw no key (all padded) outputs 0; its log-sum-exp is +inf so backward gets p = 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    _store_rows(Out + b * stride_ob, out, head, pos, row_ok, stride_oh, stride_om, HEAD_DIM, BLOCK_D)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(Lse + bh.to(tl.int64) * n_rows + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(
    Out,
    dO,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    kv_heads,
    seq_q,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Delta = rowsum(O * dO), the softmax-backward correction, per packed row."""
    n_rows = seq_q * GROUP
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kvh = bh % kv_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pos, head, row_ok = _packed_rows(rows, kvh, n_rows, GROUP)
    o = _load_rows(Out + b * stride_ob, head, pos, row_ok, stride_oh, stride_om, HEAD_DIM, BLOCK_D)
    do = _load_rows(dO + b * stride_dob, head, pos, row_ok, stride_doh, stride_dom, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * n_rows + rows, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    attend,
    keys,
    key_ok,
    q_base,
    do_base,
    lse_base,
    delta_base,
    bias_base,
    kvh,
    lo,
    hi,
    n_rows,
    qk_scale,
    seq_k,
    shift,
    stride_qh,
    stride_qm,
    stride_doh,
    stride_dom,
    stride_bh,
    stride_bm,
    stride_bn,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Everything is computed transposed ([keys, rows]) so every product has the key block as M.
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        pos, head, row_ok = _packed_rows(rows, kvh, n_rows, GROUP)
        q_t = _load_rows_t(q_base, head, pos, row_ok, stride_qh, stride_qm, HEAD_DIM, BLOCK_D)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        # Scores minus the log-sum-exp, in base 2; lse = +inf (padding rows) gives p = 0.
        s_t = tl.dot(k, q_t) * qk_scale - lse[None, :]
        if HAS_BIAS:
            ptrs = bias_base + head[None, :] * stride_bh + pos[None, :] * stride_bm + keys[:, None] * stride_bn
            bias = tl.load(ptrs, mask=row_ok[None, :] & key_ok[:, None], other=0.0)
            s_t += bias.to(tl.float32) * 1.4426950408889634
        if MASKED:
            ok = key_ok[:, None]
            if CAUSAL:
                ok = ok & (keys[:, None] <= pos[None, :] + shift)
            s_t = tl.where(ok, s_t, float("-inf"))
        if HAS_MASK:
            s_t = tl.where(attend[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t)
        do = _load_rows(do_base, head, pos, row_ok, stride_doh, stride_dom, HEAD_DIM, BLOCK_D)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
    return dk, dv


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    bias_base,
    mask_base,
    head,
    pos,
    row_ok,
    lo,
    hi,
    qk_scale,
    seq_k,
    shift,
    stride_kn,
    stride_vn,
    stride_bh,
    stride_bm,
    stride_bn,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        k_t = _load_keys_t(k_base, keys, stride_kn, seq_k, MASKED, HEAD_DIM, BLOCK_D)
        v_t = _load_keys_t(v_base, keys, stride_vn, seq_k, MASKED, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, k_t) * qk_scale - lse[:, None]
        if HAS_BIAS:
            s += _bias_tile(bias_base, head, pos, keys, row_ok, seq_k, stride_bh, stride_bm, stride_bn)
        if MASKED:
            ok = (keys < seq_k)[None, :]
            if CAUSAL:
                ok = ok & (keys[None, :] <= pos[:, None] + shift)
            s = tl.where(ok, s, float("-inf"))
        if HAS_MASK:
            attend = tl.load(mask_base + keys, mask=keys < seq_k, other=0)
            s = tl.where((attend != 0)[None, :], s, float("-inf"))
        p = tl.math.exp2(s)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq)
    return dq


@triton.jit
def _attn_bwd(
    Q,
    K,
    V,
    dO,
    Lse,
    Delta,
    dQ,
    dK,
    dV,
    Bias,
    KeyMask,
    qk_scale,
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_mb,
    batch_kv,
    kv_heads,
    seq_q,
    seq_k,
    seq_bucket,
    kv_chunk,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    KV_ATOMIC: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr,
):
    n_rows = seq_q * GROUP
    shift = seq_k - seq_q
    pid = tl.program_id(0)
    n_chunks = tl.cdiv(n_rows, kv_chunk)
    n_kv_programs = tl.cdiv(seq_k, BLOCK_N1) * batch_kv * n_chunks
    offs_d = tl.arange(0, BLOCK_D)
    if pid < n_kv_programs:
        # dK/dV of one key block over one chunk of packed rows. With several chunks
        # (KV_ATOMIC) the partial sums meet in fp32 buffers through atomic adds, so MQA's few
        # key blocks still fill the machine and no program runs much longer than the rest.
        bh = pid % batch_kv
        rest = pid // batch_kv
        chunk = rest % n_chunks
        start_n = (rest // n_chunks) * BLOCK_N1
        b = (bh // kv_heads).to(tl.int64)
        kvh = bh % kv_heads
        keys = start_n + tl.arange(0, BLOCK_N1)
        key_ok = keys < seq_k

        # Rows before `lo` see none of these keys; rows from `mid` on see all of them.
        if CAUSAL:
            lo = (tl.maximum(start_n - shift, 0) * GROUP) // BLOCK_M1 * BLOCK_M1
            lo = tl.minimum(lo, n_rows)
            mid = tl.minimum(tl.maximum(start_n + BLOCK_N1 - 1 - shift, 0) * GROUP, n_rows)
        else:
            lo = 0
            mid = 0
        if start_n + BLOCK_N1 > seq_k:
            mid = n_rows
        mid = tl.cdiv(mid, BLOCK_M1) * BLOCK_M1
        row_start = chunk * kv_chunk
        row_end = tl.minimum(row_start + kv_chunk, n_rows)
        masked_lo = tl.maximum(lo, row_start)
        masked_hi = tl.minimum(mid, row_end)
        full_lo = tl.maximum(mid, row_start)

        k = _load_keys(K + b * stride_kb + kvh * stride_kh, keys, stride_kn, seq_k, True, HEAD_DIM, BLOCK_D)
        v = _load_keys(V + b * stride_vb + kvh * stride_vh, keys, stride_vn, seq_k, True, HEAD_DIM, BLOCK_D)
        if HAS_MASK:
            attend = tl.load(KeyMask + b * stride_mb + keys, mask=key_ok, other=0) != 0
        else:
            attend = key_ok
        dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
        q_base = Q + b * stride_qb
        do_base = dO + b * stride_dob
        lse_base = Lse + bh.to(tl.int64) * n_rows
        delta_base = Delta + bh.to(tl.int64) * n_rows
        # An absent bias/mask arrives as None; no None-valued name may outlive this runtime branch.
        bias_base = Bias + b * stride_bb if HAS_BIAS else 0
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            attend,
            keys,
            key_ok,
            q_base,
            do_base,
            lse_base,
            delta_base,
            bias_base,
            kvh,
            masked_lo,
            masked_hi,
            n_rows,
            qk_scale,
            seq_k,
            shift,
            stride_qh,
            stride_qm,
            stride_doh,
            stride_dom,
            stride_bh,
            stride_bm,
            stride_bn,
            True,
            CAUSAL,
            HAS_BIAS,
            HAS_MASK,
            GROUP,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M1,
        )
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            attend,
            keys,
            key_ok,
            q_base,
            do_base,
            lse_base,
            delta_base,
            bias_base,
            kvh,
            full_lo,
            row_end,
            n_rows,
            qk_scale,
            seq_k,
            shift,
            stride_qh,
            stride_qm,
            stride_doh,
            stride_dom,
            stride_bh,
            stride_bm,
            stride_bn,
            False,
            CAUSAL,
            HAS_BIAS,
            HAS_MASK,
            GROUP,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M1,
        )
        dk = dk * softmax_scale
        out_ok = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        dk_ptrs = dK + b * stride_dkb + kvh * stride_dkh + keys[:, None] * stride_dkn + offs_d[None, :]
        dv_ptrs = dV + b * stride_dvb + kvh * stride_dvh + keys[:, None] * stride_dvn + offs_d[None, :]
        if KV_ATOMIC:
            # Chunks wholly above the causal diagonal have nothing to add.
            if (masked_lo < masked_hi) | (full_lo < row_end):
                tl.atomic_add(dk_ptrs, dk, mask=out_ok, sem="relaxed")
                tl.atomic_add(dv_ptrs, dv, mask=out_ok, sem="relaxed")
        else:
            tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=out_ok)
            tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=out_ok)
    else:
        # dQ of one block of packed rows; the last blocks (most keys under causal) first.
        bh, b, kvh, m_block, rows, pos, head, row_ok = _row_block(
            pid - n_kv_programs, n_rows, batch_kv, kv_heads, GROUP, BLOCK_M2
        )
        q = _load_rows(Q + b * stride_qb, head, pos, row_ok, stride_qh, stride_qm, HEAD_DIM, BLOCK_D)
        do = _load_rows(dO + b * stride_dob, head, pos, row_ok, stride_doh, stride_dom, HEAD_DIM, BLOCK_D)
        lse = tl.load(Lse + bh.to(tl.int64) * n_rows + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * n_rows + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)

        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        bias_base = Bias + b * stride_bb if HAS_BIAS else 0
        mask_base = KeyMask + b * stride_mb if HAS_MASK else 0
        hi, full = _causal_ranges(
            m_block * BLOCK_M2, m_block * BLOCK_M2 + BLOCK_M2 - 1, seq_q, seq_k, GROUP, CAUSAL, BLOCK_N2
        )
        dq = _bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            bias_base,
            mask_base,
            head,
            pos,
            row_ok,
            0,
            full,
            qk_scale,
            seq_k,
            shift,
            stride_kn,
            stride_vn,
            stride_bh,
            stride_bm,
            stride_bn,
            False,
            CAUSAL,
            HAS_BIAS,
            HAS_MASK,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N2,
        )
        dq = _bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            bias_base,
            mask_base,
            head,
            pos,
            row_ok,
            full,
            hi,
            qk_scale,
            seq_k,
            shift,
            stride_kn,
            stride_vn,
            stride_bh,
            stride_bm,
            stride_bn,
            True,
            CAUSAL,
            HAS_BIAS,
            HAS_MASK,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N2,
        )
        dq = dq * softmax_scale
        _store_rows(dQ + b * stride_dqb, dq, head, pos, row_ok, stride_dqh, stride_dqm, HEAD_DIM, BLOCK_D)


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


@functools.cache
def _multiprocessors(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _default_kv_splits(device: torch.device, batch_kv: int, k_len: int, n_rows: int) -> int:
    """Split each key block's rows until the dK/dV programs number about four per multiprocessor,
    keeping every chunk at least 2048 rows long so the atomic adds stay rare."""
    sms = _multiprocessors(device.index) if device.type == "cuda" else 4
    kv_programs = triton.cdiv(k_len, 128) * batch_kv
    wanted = triton.cdiv(4 * sms, kv_programs)
    return max(1, min(wanted, n_rows // 2048))


def _mask_arg(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    mask = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
    mask = _unit_last(mask)
    return mask.view(torch.uint8)


# ----------------------------------------------------------------------------------------------
# torch.library custom op (so torch.compile traces through it) and the public function
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "mqa_lm::triton_attention_fwd",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? key_padding_mask, float softmax_scale, "
    "bool causal) -> (Tensor, Tensor)",
)
def _fwd_op(q, k, v, bias, key_padding_mask, softmax_scale, causal):
    return attention_forward(
        q, k, v, softmax_scale=softmax_scale, causal=causal, bias=bias, key_padding_mask=key_padding_mask
    )


@_fwd_op.register_fake
def _fwd_op_fake(q, k, v, bias, key_padding_mask, softmax_scale, causal):
    batch, heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    out = q.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)
    lse = q.new_empty(batch * kv_heads, q_len * (heads // kv_heads), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(
    "mqa_lm::triton_attention_bwd",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, "
    "Tensor? key_padding_mask, float softmax_scale, bool causal) -> (Tensor, Tensor, Tensor)",
)
def _bwd_op(grad_out, q, k, v, out, lse, bias, key_padding_mask, softmax_scale, causal):
    # A custom op's outputs may not alias one another: dK and dV get buffers of their own here.
    batch, kv_heads, k_len, head_dim = k.shape
    dk = k.new_empty(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    dv = v.new_empty(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    return attention_backward(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        softmax_scale=softmax_scale,
        causal=causal,
        bias=bias,
        key_padding_mask=key_padding_mask,
        dk=dk,
        dv=dv,
    )


@_bwd_op.register_fake
def _bwd_op_fake(grad_out, q, k, v, out, lse, bias, key_padding_mask, softmax_scale, causal):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    dq = q.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)
    dk = k.new_empty(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    dv = v.new_empty(batch, k_len, kv_heads, head_dim).transpose(1, 2)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, bias, key_padding_mask, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, key_padding_mask)
    ctx.softmax_scale = softmax_scale
    ctx.causal = causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, bias, key_padding_mask, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager mode: the custom op's dispatch
    costs host time on every call (more than a kernel launch), and eager needs no tracing."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, softmax_scale, causal):
        out, lse = attention_forward(
            q, k, v, softmax_scale=softmax_scale, causal=causal, bias=bias, key_padding_mask=key_padding_mask
        )
        ctx.save_for_backward(q, k, v, out, lse, bias, key_padding_mask)
        ctx.softmax_scale = softmax_scale
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            softmax_scale=ctx.softmax_scale,
            causal=ctx.causal,
            bias=bias,
            key_padding_mask=key_padding_mask,
        )
        return dq, dk, dv, None, None, None, None


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> None:
    """Raise TypeError/ValueError naming the first input these kernels cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {list(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {list(k.shape)} and v {list(v.shape)} must have the same shape")
    batch, heads, q_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v shape {list(k.shape)} must be [batch={batch}, kv_heads, k_len, head_dim={head_dim}] to match q"
        )
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={k.shape[1]} (1 = MQA, heads = MHA)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton attention kernels take fp16/bf16 (fp32 on CPU), got {q.dtype}")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise TypeError("the Triton attention kernels take fp16/bf16 on CUDA; cast to bf16 or use attn_impl='torch'")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} exceeds the kernels' limit of {MAX_HEAD_DIM}; use attn_impl='torch'")
    k_len = k.shape[2]
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point additive tensor, got {bias.dtype}")
        shape = (batch, heads, q_len, k_len)
        if bias.dim() != 4 or any(s not in (1, full) for s, full in zip(bias.shape, shape)):
            raise ValueError(f"bias of shape {list(bias.shape)} must be 4-D and broadcastable to {list(shape)}")
        if bias.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "the Triton kernels do not compute a gradient for bias; detach it or use attn_impl='torch'"
            )
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q on {q.device}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, k_len):
            raise ValueError(
                f"key_padding_mask must have shape [batch={batch}, k_len={k_len}], got {list(key_padding_mask.shape)}"
            )
        if key_padding_mask.is_floating_point():
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q on {q.device}")


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash attention of q [b, h, q_len, d] over k, v [b, kv_heads, k_len, d]; differentiable in
    q, k and v, traceable by ``torch.compile`` (through the custom op ``mqa_lm::triton_attention_fwd``;
    eager calls skip its dispatch).

    ``causal`` is aligned bottom-right (query ``i`` sees key ``j`` iff ``j <= i + k_len - q_len``);
    ``bias`` is additive, 4-D and broadcastable to [b, h, q_len, k_len] (no gradient);
    ``key_padding_mask`` is bool [b, k_len], True = attend. A query that sees no key outputs zeros.
    Runs on CUDA (fp16/bf16), or on CPU tensors under ``TRITON_INTERPRET=1`` (fp32/fp16 too).
    """
    check_attention_inputs(q, k, v, bias, key_padding_mask)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    if torch.compiler.is_compiling():
        out, _ = _fwd_op(q, k, v, bias, key_padding_mask, float(softmax_scale), bool(causal))
        return out
    return _EagerAttention.apply(q, k, v, bias, key_padding_mask, float(softmax_scale), bool(causal))
