"""Float64 reference math for the tests, written from the definitions and independent of
``mqa_lm.kernels`` and of the block's own code paths: plain matmul + softmax attention with GQA by
``repeat_interleave``, bottom-right causal masking, key padding, additive bias cropped to its last
rows/columns, LayerNorm/RMSNorm by formula, RoPE as a complex rotation, ALiBi from Press et al.'s
recursive slope definition, and a whole-model forward assembled from those pieces.

Shared by test_attention.py, test_model.py and test_gpu_core.py (a helper module rather than a
conftest so the test files can import plain functions).
"""

from __future__ import annotations

import math

import torch

NORM_EPS = 1e-5


def ref_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, h, sq, d], k/v [b, kvh, sk, d] -> (context [b, h, sq, d], probs [b, h, sq, sk]) in fp64.

    A query with no visible key gets zero probabilities and a zero context.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    group = h // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        bias = bias.double()
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        scores = scores + bias[..., -sq:, -sk:]
    allowed = torch.ones(b, 1, sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        allowed = allowed & (j <= i + (sk - sq))
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.where(has_key, torch.softmax(scores, dim=-1), torch.zeros((), dtype=scores.dtype, device=q.device))
    return probs @ v, probs


def ref_layernorm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = NORM_EPS
) -> torch.Tensor:
    x = x.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps) * weight.double()
    return out if bias is None else out + bias.double()


def ref_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + eps) * weight.double()


def ref_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a LayerNorm-like (has a bias) or RMSNorm-like module's parameters by formula."""
    if getattr(norm, "bias", None) is not None:
        return ref_layernorm(x, norm.weight, norm.bias)
    return ref_rmsnorm(x, norm.weight)


def ref_rope(x: torch.Tensor, offset: int, theta: float) -> torch.Tensor:
    """Rotate feature pairs (i, i + d/2) of x [b, h, s, d] by angle pos * theta^(-2i/d), as complex
    multiplication (the GPT-NeoX "rotate half" layout)."""
    d = x.shape[-1]
    half = d // 2
    x = x.double()
    pos = torch.arange(offset, offset + x.shape[-2], dtype=torch.float64, device=x.device)
    freqs = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / d)
    rot = torch.polar(torch.ones(len(pos), half, dtype=torch.float64, device=x.device), pos[:, None] * freqs[None, :])
    z = torch.complex(x[..., :half], x[..., half:]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def press_alibi_slopes(heads: int) -> list[float]:
    """ALiBi slopes as defined in Press et al.'s reference code (recursive for non-powers of 2)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + press_alibi_slopes(2 * closest)[0::2][: heads - closest]


def ref_alibi(heads: int, seq: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, heads, seq, seq] with -slope * (i - j): the textbook ALiBi bias for causal attention."""
    slopes = torch.tensor(press_alibi_slopes(heads), dtype=torch.float64, device=device)
    i = torch.arange(seq, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(seq, dtype=torch.float64, device=device)[None, :]
    return (-slopes[:, None, None] * (i - j))[None]


def ref_qkv(attn: torch.nn.Module, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh q [b, h, s, d] and k, v [b, kvh, s, d] in fp64 from the block's Wqkv weights."""
    b, s, dim = x.shape
    heads, kv_heads = attn.heads, attn.kv_heads
    head_dim = dim // heads
    qkv = x.double() @ attn.Wqkv.weight.double().T
    if attn.Wqkv.bias is not None:
        qkv = qkv + attn.Wqkv.bias.double()
    if attn.clip_qkv is not None:
        qkv = qkv.clamp(-attn.clip_qkv, attn.clip_qkv)
    q = qkv[..., :dim]
    k = qkv[..., dim : dim + kv_heads * head_dim]
    v = qkv[..., dim + kv_heads * head_dim :]
    if attn.qk_ln:
        q, k = ref_norm(attn.q_ln, q), ref_norm(attn.k_ln, k)
    q = q.reshape(b, s, heads, head_dim).transpose(1, 2)
    k = k.reshape(b, s, kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(b, s, kv_heads, head_dim).transpose(1, 2)
    if attn.rotary is not None:
        q, k = ref_rope(q, offset, attn.rotary.theta), ref_rope(k, offset, attn.rotary.theta)
    return q, k, v


def ref_block(
    attn: torch.nn.Module,
    x: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The whole MultiQueryAttention forward in fp64 from the module's parameters.

    ``softmax_scale`` is what the test passed to the constructor (None: 1/sqrt(head_dim), computed
    here rather than read back from the module).
    """
    b, s, dim = x.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim // attn.heads)
    past_len = 0 if past is None else past[0].shape[2]
    q, k, v = ref_qkv(attn, x, offset=past_len)
    if past is not None:
        k = torch.cat([past[0].double(), k], dim=2)
        v = torch.cat([past[1].double(), v], dim=2)
    ctx, probs = ref_attention(q, k, v, scale=scale, causal=causal, bias=bias, mask=mask)
    ctx = ctx.transpose(1, 2).reshape(b, s, dim)
    out = ctx @ attn.out_proj.weight.double().T
    if attn.out_proj.bias is not None:
        out = out + attn.out_proj.bias.double()
    return out, probs, (k, v)


def ref_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = x.double() @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def ref_mlp(mlp: torch.nn.Module, x: torch.Tensor, mlp_type: str) -> torch.Tensor:
    h = ref_linear(mlp.up_proj, x)
    if mlp_type == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = gate * torch.sigmoid(gate) * up
    else:
        h = ref_gelu_tanh(h)
    return ref_linear(mlp.down_proj, h)


def ref_model_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """fp64 logits of an MQATransformer (eval mode, no cache) assembled from the reference pieces."""
    c = model.config
    seq = idx.shape[1]
    x = model.wte.weight.double()[idx]
    if c.pos_emb == "learned":
        x = x + model.wpe.weight.double()[:seq]
    bias = ref_alibi(c.heads, seq, idx.device) if c.pos_emb == "alibi" else None
    for block in model.blocks:
        a, _, _ = ref_block(block.attn, ref_norm(block.norm_1, x), bias=bias, softmax_scale=c.softmax_scale)
        x = x + a
        x = x + ref_mlp(block.mlp, ref_norm(block.norm_2, x), c.mlp_type)
    head = model.wte.weight if c.tie_embeddings else model.lm_head.weight
    return ref_norm(model.norm_f, x) @ head.double().T
