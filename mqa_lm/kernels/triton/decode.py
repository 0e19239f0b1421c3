"""Split-KV ("flash-decoding") attention for one query token per row over a static KV cache.

Layout: queries ``q`` [batch, heads, 1, head_dim]; the caches ``k_cache``/``v_cache``
[batch, kv_heads, max_len, head_dim] (unit last stride). Decoding reads every cached key once per
token, so the kernel is bound by memory bandwidth, and two things keep that bandwidth high:

* The ``group = heads // kv_heads`` query heads that share one K/V head are packed into the M
  dimension of one tile (padded to at least 16 rows for ``tl.dot``), so every K/V tile is loaded
  once for all of them: MQA reads the cache once per token, not once per query head.
* The key axis is split across programs (``split_size`` keys each), so a single long row still
  fills the GPU. Each program writes its partial (max, sum, unnormalised output) in fp32 and a
  second small kernel combines the splits of each head (with one split, as for a short cache, the
  program writes the output itself and the second launch is skipped).

The number of keys to read comes from a device tensor (``lengths``), not from the shapes: a
CUDA graph captured once replays for every length, and programs whose split lies past the length
do no work. A key padding mask (left-padded prompts) and an additive bias (ALiBi) are optional.
A row that can see no key outputs zeros, as in every other backend (mqa_lm.kernels.common).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mqa_lm.kernels.common import cuda_properties, dependent_launch_mode, triton_interpreting

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_SPLITS = 128


@triton.jit
def dependent_launch_sync(GDC: tl.constexpr):
    """A dependent launch's wait for the kernel before it (``GDC`` from
    :func:`~mqa_lm.kernels.common.dependent_launch_mode`: 0 a plain launch, nothing to do) and its
    signal that the next kernel may start: before the wait (1) or after it (2). A kernel calls it
    before its first read of anything an earlier kernel wrote; only weights may be read before."""
    if GDC == 1:
        tl.extra.cuda.gdc_launch_dependents()
    if GDC != 0:
        tl.extra.cuda.gdc_wait()
    if GDC == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _decode_split(
    Q,
    K,
    V,
    Bias,
    KeyMask,
    Lengths,
    PartAcc,
    PartMax,
    PartSum,
    Out,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_bb,
    stride_bh,
    stride_bn,
    stride_mb,
    stride_lb,
    stride_ob,
    stride_oh,
    heads,
    kv_heads,
    k_len,
    split_size,
    n_splits,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    GDC: tl.constexpr,
    DIRECT: tl.constexpr,
):
    dependent_launch_sync(GDC)  # nothing the kernel before wrote is read before this
    split = tl.program_id(0)
    bkv = tl.program_id(1)
    h_block = tl.program_id(2)
    b = (bkv // kv_heads).to(tl.int64)
    kvh = bkv % kv_heads

    length = k_len
    if HAS_LENGTHS:
        length = tl.minimum(tl.load(Lengths + b * stride_lb).to(tl.int32), k_len)
    start = split * split_size
    end = tl.minimum(start + split_size, length)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    member = h_block * BLOCK_M + offs_m
    row_ok = member < GROUP
    head = kvh * GROUP + member
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Zero iterations for a split that lies past the row's length.
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        key_ok = keys < end
        k = tl.load(
            k_base + keys[:, None] * stride_kn + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0
        )  # noqa: E501 (jit body left as verified on the GPU)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_BIAS:
            b_ptrs = Bias + b * stride_bb + head[:, None] * stride_bh + keys[None, :] * stride_bn
            bias = tl.load(b_ptrs, mask=row_ok[:, None] & key_ok[None, :], other=0.0)
            qk += bias.to(tl.float32) * 1.4426950408889634
        ok = key_ok
        if HAS_MASK:
            attend = tl.load(KeyMask + b * stride_mb + keys, mask=key_ok, other=0)
            ok = ok & (attend != 0)
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key keeps max -inf; subtracting 0 instead keeps exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + keys[:, None] * stride_vn + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0
        )  # noqa: E501 (jit body left as verified on the GPU)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    if DIRECT:  # one split: this program saw every key, so it normalises and writes the output
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw no key stays 0
        o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Partials per (batch, query head, split): [b * heads, n_splits] and [b * heads, n_splits, d].
        part = (b * heads + head).to(tl.int64) * n_splits + split
        tl.store(PartMax + part, m_i, mask=row_ok)
        tl.store(PartSum + part, l_i, mask=row_ok)
        tl.store(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine(
    PartAcc,
    PartMax,
    PartSum,
    Lengths,
    Out,
    stride_ob,
    stride_oh,
    stride_lb,
    heads,
    k_len,
    split_size,
    n_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    GDC: tl.constexpr,
):
    dependent_launch_sync(GDC)
    pid = tl.program_id(0)  # batch * heads + head
    b = pid // heads
    h = pid % heads
    used = n_splits
    if HAS_LENGTHS:
        length = tl.minimum(tl.load(Lengths + b.to(tl.int64) * stride_lb).to(tl.int32), k_len)
        used = tl.cdiv(length, split_size)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < used
    d_ok = offs_d < HEAD_DIM
    base = pid.to(tl.int64) * n_splits
    m = tl.load(PartMax + base + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(PartSum + base + offs_s, mask=s_ok, other=0.0)  # noqa: E741 (jit body left as verified on the GPU)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_safe)  # 0 for splits that saw no key
    total = tl.sum(l * w, 0)
    acc = tl.load(
        PartAcc + (base + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
    )  # noqa: E501 (jit body left as verified on the GPU)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _block_n(block_d: int) -> int:
    """The smallest key tile the split kernel takes for ``block_d``: split sizes are a multiple of it."""
    if triton_interpreting():
        return 16  # several key tiles per split even at tiny test lengths
    return 32 if block_d > 128 else 64


# A cache of at most this many keys is read by one program per K/V head (a single split, no combine).
SINGLE_SPLIT_MAX_LEN = 256
# Splits are a multiple of this many keys: one 128-key tile, the split measured fastest wherever the
# GPU has programs to spare (H100: 3.8 us for 2k keys at batch 1 in 128-key splits, 5.5 in 256-key).
MIN_SPLIT = 128


def split_plan(
    batch: int, kv_heads: int, heads: int, max_len: int, device: torch.device, split_size: int | None = None
) -> tuple[int, int, int]:
    """(split_size, n_splits, block_m) for a cache of ``max_len`` keys.

    The plan depends on the shapes only, never on the current length, so one CUDA graph serves a
    whole generation. Without ``split_size``: a cache of at most ``SINGLE_SPLIT_MAX_LEN`` keys is one
    split; a longer one is cut so that a full cache gives about two programs per multiprocessor
    (:func:`balanced_split`). Measured on an
    H100 (``scripts/bench_generate.py --sweep-attention``): at batch 1 many one-tile programs win
    (the kernel is latency-bound), at batch 16-32 and long caches fewer, longer splits win (the
    combine's traffic and launch are then the cost), and two programs per SM is where both meet.
    """
    group = heads // kv_heads
    block_m = min(64, max(16, triton.next_power_of_2(group)))
    h_blocks = triton.cdiv(group, block_m)
    block_n = _block_n(MAX_HEAD_DIM)  # the smallest tile: split sizes are a multiple of every tile
    if split_size is None:
        if triton_interpreting():
            split_size = 2 * _block_n(MAX_HEAD_DIM)
        elif max_len <= SINGLE_SPLIT_MAX_LEN:
            split_size = max_len
        else:
            sms = cuda_properties(device)[1] if device.type == "cuda" else 8
            split_size = balanced_split(max_len, batch * kv_heads * h_blocks, sms)
    split_size = max(block_n, triton.cdiv(split_size, block_n) * block_n)
    n_splits = triton.cdiv(max(max_len, 1), split_size)
    if n_splits > MAX_SPLITS:
        split_size = triton.cdiv(triton.cdiv(max_len, MAX_SPLITS), block_n) * block_n
        n_splits = triton.cdiv(max_len, split_size)
    return split_size, n_splits, block_m


def balanced_split(max_len: int, rows: int, sms: int) -> int:
    """Keys per split for ``rows`` programs per split (batch x K/V heads x head blocks) on ``sms``
    multiprocessors: about two programs per SM, in a multiple of ``MIN_SPLIT`` keys, at most
    ``MAX_SPLITS`` splits, rounded down or up to whichever leaves the busiest SM the fewest keys.
    Rounding up can spill a few programs into a wave of their own (H100, batch 32, 32k keys: nine
    splits of 3712 keys, 288 programs on 132 SMs, 94.1 us, against eight splits of 4096, 256
    programs, 91.7 us); rounding down can leave SMs idle (192 rows: one split puts two programs on
    60 SMs and one on the rest, where two splits spread 384 programs over three waves)."""

    def split(n_splits: int) -> int:
        return triton.cdiv(triton.cdiv(max_len, min(max(n_splits, 1), MAX_SPLITS)), MIN_SPLIT) * MIN_SPLIT

    def busiest(size: int) -> int:  # keys read by the SM with the most programs
        return triton.cdiv(rows * triton.cdiv(max_len, size), sms) * size

    down, up = split(2 * sms // rows), split(triton.cdiv(2 * sms, rows))
    return min((down, up), key=lambda size: (busiest(size), -size))


def split_launch(programs: int, block_d: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of the split kernel for a grid of ``programs``. Measured
    on an H100 at head_dim 64: 128-key tiles (4 warps) while the programs fit on the SMs at once,
    where each program's load latency is the cost; 64-key tiles with 2 warps past that, where the
    reads stream at the card's bandwidth and smaller programs interleave better."""
    if triton_interpreting():
        return 16, 1, 1
    if block_d > 64:
        return _block_n(block_d), 4, 3
    sms = cuda_properties(device)[1] if device.type == "cuda" else 8
    return (128, 4, 3) if programs <= sms else (64, 2, 3)


def check_decode_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """Raise TypeError/ValueError naming the first input :func:`decode_attention` cannot take."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor, got {got}")
    batch, heads, q_len, head_dim = q.shape
    if q_len != 1:
        raise ValueError(f"decode_attention takes one query token per row, got q of shape {list(q.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} must have the same shape")
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache shape {list(k_cache.shape)} must be [batch={batch}, kv_heads, max_len, head_dim={head_dim}]"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads} (1 = MQA, heads = MHA)")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q and the caches must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"decode_attention takes fp16/bf16 (fp32 under TRITON_INTERPRET=1), got {q.dtype}")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise TypeError("decode_attention takes fp16/bf16 on CUDA; cast the model to bf16 or use the SDPA path")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # Triton's interpreter computes bf16 tiles wrongly (the training kernels' too).
        raise TypeError("decode_attention under TRITON_INTERPRET=1 takes fp32/fp16, not bf16; cast the inputs")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"q and the caches must be on one device, got {q.device}, {k_cache.device}, {v_cache.device}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} exceeds the decode kernel's limit of {MAX_HEAD_DIM}")
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != batch or lengths.is_floating_point():
            raise ValueError(
                f"lengths must be an integer tensor [batch={batch}], got {lengths.dtype} {list(lengths.shape)}"
            )
        if lengths.device != q.device:
            raise ValueError(f"lengths is on {lengths.device} but q on {q.device}")
    if key_mask is not None:
        if tuple(key_mask.shape) != (batch, max_len) or key_mask.is_floating_point():
            raise ValueError(
                f"key_mask must be bool [batch={batch}, max_len={max_len}] (True = attend), "
                f"got {key_mask.dtype} {list(key_mask.shape)}"
            )
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device} but q on {q.device}")
    if bias is not None:
        shape = (batch, heads, 1, max_len)
        if not bias.is_floating_point() or bias.dim() != 4 or any(s not in (1, f) for s, f in zip(bias.shape, shape)):
            raise ValueError(
                f"bias must be a float tensor broadcastable to {list(shape)} (last dim = the cache length), "
                f"got {bias.dtype} {list(bias.shape)}"
            )
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q on {q.device}")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    split_size: int | None = None,
    out: torch.Tensor | None = None,
    check: bool = True,
    launch: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Attention of one query per row, ``q`` [b, h, 1, d], over ``k_cache``/``v_cache``
    [b, kv_heads, max_len, d]; returns [b, h, 1, d] (written into ``out`` when given).

    Args:
        lengths: int [b]: row ``i`` attends keys ``0 .. lengths[i] - 1`` (default: all
            ``max_len``). Read on the device, so the call never synchronises with the host.
        key_mask: bool [b, max_len], True = attend (e.g. False over a row's left padding).
        bias: additive, broadcastable to [b, h, 1, max_len] (ALiBi), added in fp32.
        softmax_scale: defaults to ``1 / sqrt(d)``.
        split_size: keys per program (rounded up to the key tile); default from :func:`split_plan`.
        check: validate the inputs (skip it in a captured decode step that was checked once).
        launch: ``(BLOCK_N, num_warps, num_stages)`` of the split kernel instead of the defaults
            (benchmarks).

    With a single split (a short cache, or ``split_size >= max_len``) the one kernel writes the
    output; otherwise a second kernel combines the splits' partial results.
    """
    if check:
        check_decode_inputs(q, k_cache, v_cache, lengths, key_mask, bias)
    batch, heads, _, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if out is None:
        out = torch.empty(batch, heads, 1, head_dim, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a unit stride along head_dim")
    size, n_splits, block_m = split_plan(batch, kv_heads, heads, max_len, q.device, split_size)
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    direct = n_splits == 1
    if direct:  # no partials: the kernel never touches them
        part_acc = part_max = part_sum = out
    else:
        part_acc = torch.empty(batch * heads * n_splits * head_dim, device=q.device, dtype=torch.float32)
        part_max = torch.empty(batch * heads * n_splits, device=q.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    mask = None
    if key_mask is not None:
        mask = key_mask if key_mask.dtype == torch.bool else key_mask != 0
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask = mask.view(torch.uint8)
    bias_strides = (0, 0, 0)
    if bias is not None:
        expanded = bias.expand(batch, heads, 1, max_len)
        bias_strides = (expanded.stride(0), expanded.stride(1), expanded.stride(3))
    lengths_stride = lengths.stride(0) if lengths is not None else 0
    interpreting = triton_interpreting()
    gdc = dependent_launch_mode(q.device)
    grid = (n_splits, batch * kv_heads, triton.cdiv(group, block_m))
    block_n, warps, stages = launch or split_launch(math.prod(grid), block_d, q.device)
    _decode_split[grid](
        q,
        k_cache,
        v_cache,
        bias,
        mask,
        lengths,
        part_acc,
        part_max,
        part_sum,
        out,
        softmax_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        *bias_strides,
        mask.stride(0) if mask is not None else 0,
        lengths_stride,
        out.stride(0),
        out.stride(1),
        heads,
        kv_heads,
        max_len,
        size,
        n_splits,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        HAS_LENGTHS=lengths is not None,
        GDC=gdc,
        DIRECT=direct,
        num_warps=warps,
        num_stages=stages,
        launch_pdl=gdc != 0,
    )
    if direct:
        return out
    _decode_combine[(batch * heads,)](
        part_acc,
        part_max,
        part_sum,
        lengths,
        out,
        out.stride(0),
        out.stride(1),
        lengths_stride,
        heads,
        max_len,
        size,
        n_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
        HAS_LENGTHS=lengths is not None,
        GDC=gdc,
        num_warps=1 if interpreting else (4 if n_splits * block_d <= 8192 else 8),
        launch_pdl=gdc != 0,
    )
    return out


def decode_bytes(batch: int, kv_heads: int, length: int, head_dim: int, element_size: int) -> int:
    """Bytes of K and V one decode step must read at ``length`` cached keys (for GB/s figures)."""
    return 2 * batch * kv_heads * length * head_dim * element_size


@torch.library.custom_op(
    "mqa_lm::decode_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? lengths, Tensor? key_mask, Tensor? bias, "
    "float softmax_scale, int? split_size) -> Tensor",
)
def decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    softmax_scale: float,
    split_size: int | None,
) -> torch.Tensor:
    """:func:`decode_attention` as a ``torch.library`` op, so a compiled decode step traces through it
    (no graph break) and Inductor fuses what surrounds it. Inputs are not checked here: the decode
    step's shapes were fixed when its cache was built."""
    return decode_attention(
        q,
        k_cache,
        v_cache,
        lengths=lengths,
        key_mask=key_mask,
        bias=bias,
        softmax_scale=softmax_scale,
        split_size=split_size,
        check=False,
    )


@decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, lengths, key_mask, bias, softmax_scale, split_size):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
