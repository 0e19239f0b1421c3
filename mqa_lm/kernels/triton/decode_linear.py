"""One decode step's linear layers with what surrounds them fused in: a norm before, and bias,
activation (GELU or SwiGLU) and residual add after.

A decode step multiplies a few rows (one per sequence) by each weight matrix, so it is bound by
reading the weights, and at GPT-2-small size each matrix is 1-5 MB: a few microseconds at the card's
bandwidth, about what one launch costs. cuBLAS picks tiles made for many rows (64 output columns a
program: 12-48 programs on a GPU of 132 SMs for d_model 768), and the norm, bias, activation and
residual add each cost a launch of their own. Here one program computes ``BLOCK_N`` output columns
for every row (``BLOCK_N`` small enough that the programs cover the GPU), and the norm's statistics
come from a prologue pass over the rows (a few KB, in L2), so a transformer layer's MLP and
projections take four launches instead of ten. (Folding the norm into the main pass instead, as
``rstd * (x.(gamma*w) - mean * sum(gamma*w)) + beta.w``, was slower on an H100: the per-tile column
sums of gamma*w cost more than the prologue.)

Layout: ``x`` [M, K] with unit last stride, ``weight`` [N, K] (``nn.Linear``'s), ``bias`` [N]; the
output is [M, N] (SwiGLU: [M, N/2], the gate in the first half of the weight's rows, as
:class:`~mqa_lm.nn.mlp.MLP` stores it). Statistics and accumulation in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mqa_lm.kernels.common import dependent_launch_mode, triton_interpreting
from mqa_lm.kernels.triton.decode import dependent_launch_sync

ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "swiglu": 2}
NORMS = {"none": 0, "layernorm": 1, "rmsnorm": 2}


@triton.jit
def _prefetch_rows(ptrs, nbytes):
    """Start bringing ``nbytes`` from each of ``ptrs`` (16-byte aligned, ``nbytes`` a multiple of 16)
    into L2 and return at once (sm_90's bulk prefetch): a dependent launch reads its weights while
    the kernel before it still runs."""
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
        "=r,l,r",
        [ptrs, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _norm_stats(X, stride_xm, rm, M, K, eps, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row mean (0 for RMSNorm) and 1/std of x [M, K] in fp32, in one pass over K (x is in L2):
    LayerNorm merges each tile's mean and squared deviations into the running ones (Chan et al.), so
    a large mean does not cancel the variance away."""
    row_ok = rm < M
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (rk[None, :] < K)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=ok, other=0.0).to(tl.float32)
        if NORM == 1:
            seen = k0 * 1.0  # every earlier tile was whole
            count = tl.minimum(K - k0, BLOCK_K) * 1.0
            tile_mean = tl.sum(x, axis=1) / count
            centred = tl.where(ok, x - tile_mean[:, None], 0.0)
            delta = tile_mean - mean
            mean += delta * (count / (seen + count))
            m2 += tl.sum(centred * centred, axis=1) + delta * delta * (seen * count / (seen + count))
        else:
            m2 += tl.sum(x * x, axis=1)
    return mean, 1.0 / tl.sqrt(m2 / K + eps)


@triton.jit
def _fused_linear(
    X,
    W,
    B,
    R,
    Out,
    NW,
    NB,
    M,
    N,
    K,
    up_offset,
    row_bytes,
    eps,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    KV,
    Slot,
    kv_start,
    kv_width,
    head_dim,
    stride_kvb,
    stride_kv2,
    stride_kvh,
    stride_kvl,
    NORM: tl.constexpr,
    NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    WRITE_KV: tl.constexpr,
    GDC: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[:, n] = residual + act(norm(x) @ weight[n].T + bias[n]) for this program's BLOCK_N columns.
    SwiGLU (ACT 2): silu(gate) * up with the gate from rows n and up from rows n + up_offset. The
    normalised input is rounded to the weight's dtype before the product, as the unfused norm's
    output is.

    GDC (a dependent launch, :func:`~mqa_lm.kernels.common.dependent_launch_mode`): this kernel reads
    nothing the previous one wrote (x, the residual, the slot) before ``gdc_wait``, only the
    weights, which PREFETCH brings into L2 meanwhile; the next kernel may start before (1) or after
    (2) that wait."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    col_ok = rn < N
    if PREFETCH:  # only with GDC != 0: the weights stream into L2 while the kernel before runs
        rows = tl.minimum(rn, N - 1)  # a partial tile fetches its last row again
        size = tl.full([BLOCK_N], 0, tl.int32) + row_bytes
        _prefetch_rows(W + rows * stride_wn, size)
        if ACT == 2:
            _prefetch_rows(W + (rows + up_offset) * stride_wn, size)
    dependent_launch_sync(GDC)
    if NORM != 0:
        mean, rstd = _norm_stats(X, stride_xm, rm, M, K, eps, NORM, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ACT == 2:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w_ptrs = W + rn[None, :] * stride_wn + rk[:, None]
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM != 0:
            xf = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            xf = xf * tl.load(NW + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if NORM_BIAS:
                xf = xf + tl.load(NB + rk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            x = xf.to(w.dtype)
        else:
            x = x.to(w.dtype)
        acc += tl.dot(x, w)
        if ACT == 2:
            w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up += tl.dot(x, w_up)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 2:
            acc_up += tl.load(B + up_offset + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # GELU, tanh form: 0.5 (1 + tanh(z)) = sigmoid(2z)
        acc = acc * tl.sigmoid(2.0 * 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc))
    elif ACT == 2:
        acc = acc * tl.sigmoid(acc) * acc_up
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        acc += tl.load(R + rm[:, None] * stride_rm + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + rm[:, None] * stride_om + rn[None, :], acc.to(Out.dtype.element_ty), mask=ok)
    if WRITE_KV:  # columns kv_start.. are K then V: also into the cache at the slot
        j = rn - kv_start
        which = j // kv_width
        head = (j % kv_width) // head_dim
        offset = which * stride_kv2 + head * stride_kvh + tl.load(Slot) * stride_kvl + j % head_dim
        kv_ok = ok & (j >= 0)[None, :]
        tl.store(KV + rm[:, None] * stride_kvb + offset[None, :], acc.to(KV.dtype.element_ty), mask=kv_ok)


MAX_ROWS = 16  # one BLOCK_M tile of rows: past it cuBLAS's tiles are the better choice
# Off only to measure what the weights' prefetch during a dependent launch gains.
PREFETCH_WEIGHTS = True
# A matrix larger than this is not prefetched: a vocabulary-wide head (77 MB at GPT-2 size) is more
# than L2 holds, and its programs run in several waves, of which only the first starts early.
PREFETCH_MAX_BYTES = 16 * 2**20


def plan(rows: int, out_features: int, in_features: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``: BLOCK_N small enough that the programs
    cover the GPU's SMs (132 on an H100) for d_model 768-4096, larger for a vocabulary-wide head."""
    if triton_interpreting():
        return 16, 16, 32, 1, 1
    # Measured on an H100 (scripts/bench_decode_linear.py --sweep, GPT-2-small's layers at 1 and 16
    # rows): 48-56 programs of 16 columns for d_model-wide outputs, 96 of 32 for the 4x-wide MLP,
    # 64-column tiles for a vocabulary; long tiles of K (few loop trips: the loads' latency, not
    # their bandwidth, is what a 1-5 MB matrix pays).
    block_n = 16 if out_features <= 1024 else 32 if out_features <= 8192 else 64
    block_k = 256 if in_features <= 1024 else 512
    return 16, block_n, block_k, 4, 2 if block_n == 64 else 3


def output_features(weight: torch.Tensor, activation: str = "none") -> int:
    """Columns of :func:`fused_linear`'s output for ``weight`` [N, K]: N, or N / 2 for SwiGLU."""
    return weight.shape[0] // 2 if ACTIVATIONS[activation] == 2 else weight.shape[0]


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: str = "none",
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    launch: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``residual + act(norm(x) @ weight.T + bias)`` for ``x`` [..., K] of at most
    :data:`MAX_ROWS` rows, in one launch. ``norm``: ``none``, ``layernorm`` (``norm_weight``,
    optional ``norm_bias``) or ``rmsnorm``; ``activation``: ``none``, ``gelu_tanh`` or ``swiglu``
    (``silu(gate) * up``, gate and up the two halves of the output features). ``kv_cache``: a
    layer's packed cache [rows, 2, kv_heads, max_len, head_dim]: the output's last ``2 * kv_heads *
    head_dim`` columns (a QKV projection's keys and values) are also written into it at ``slot`` (a
    device tensor [1]). ``launch``: ``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` instead of
    :func:`plan`'s (benchmarks)."""
    lead, in_features = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"fused_linear takes at most {MAX_ROWS} rows, got {rows}")
    if weight.stride(-1) != 1 or weight.shape[1] != in_features:
        raise ValueError(f"weight must be [N, {in_features}] with unit last stride, got {list(weight.shape)}")
    act = ACTIVATIONS[activation]
    out_features = output_features(weight, activation)
    out = torch.empty(rows, out_features, device=x.device, dtype=x.dtype)
    res = None
    if residual is not None:
        res = residual.reshape(rows, out_features)
        if res.stride(-1) != 1:
            res = res.contiguous()
    kv_args: tuple = (out, out, 0, 1, 1, 0, 0, 0, 0)
    if kv_cache is not None:
        if slot is None or kv_cache.dim() != 5 or kv_cache.shape[0] != rows or kv_cache.shape[1] != 2:
            raise ValueError(
                f"kv_cache must be [{rows}, 2, kv_heads, max_len, head_dim] with a slot, got {list(kv_cache.shape)}"
            )
        kv_width = kv_cache.shape[2] * kv_cache.shape[4]
        if kv_cache.stride(-1) != 1 or 2 * kv_width > out_features:
            raise ValueError(f"kv_cache {list(kv_cache.shape)} does not fit an output of {out_features} features")
        kv_args = (kv_cache, slot, out_features - 2 * kv_width, kv_width, kv_cache.shape[4], *kv_cache.stride()[:4])
    block_m, block_n, block_k, warps, stages = plan(rows, out_features, in_features)
    gdc = dependent_launch_mode(x.device)
    size = weight.element_size()
    prefetch = (
        gdc != 0
        and PREFETCH_WEIGHTS
        and weight.shape[0] * in_features * size <= PREFETCH_MAX_BYTES
        and weight.data_ptr() % 16 == 0
        and (weight.stride(0) * size) % 16 == 0
        and (in_features * size) % 16 == 0
    )
    if launch is not None:
        block_n, block_k, warps, stages = launch
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(rows, block_m))
    _fused_linear[grid](
        x2,
        weight,
        bias if bias is not None else weight,
        res if res is not None else out,
        out,
        norm_weight if norm_weight is not None else weight,
        norm_bias if norm_bias is not None else weight,
        rows,
        out_features,
        in_features,
        out_features,
        in_features * size,
        eps,
        x2.stride(0),
        weight.stride(0),
        res.stride(0) if res is not None else 0,
        out.stride(0),
        *kv_args,
        NORM=NORMS[norm],
        NORM_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None,
        HAS_RES=res is not None,
        ACT=act,
        WRITE_KV=kv_cache is not None,
        GDC=gdc,
        PREFETCH=prefetch,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=gdc != 0,
    )
    return out.view(*lead, out_features)
