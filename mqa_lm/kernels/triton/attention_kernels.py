"""The Triton kernels of flash attention for MQA/GQA: forward, backward (dK/dV and dQ programs) and delta.

Launched by :mod:`~mqa_lm.kernels.triton.attention_launch`; used through
:func:`~mqa_lm.kernels.triton.attention.triton_attention`.

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

import triton
import triton.language as tl

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
