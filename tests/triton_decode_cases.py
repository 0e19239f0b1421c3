"""The Triton decode kernel and the engine on it, under ``TRITON_INTERPRET=1`` on CPU tensors.

Not collected by a plain ``pytest`` run: ``tests/test_inference.py`` runs this module in a
subprocess with the interpreter switched on before Triton is imported. Lengths are odd and the
interpreter's split size is 32 keys with 16-key tiles, so rows end mid-tile, mid-split, and
splits lie wholly past a row's length.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 set before Triton is imported"
)

from mqa_lm import MQAConfig, MQATransformer  # noqa: E402
from mqa_lm.inference import InferenceEngine  # noqa: E402
from mqa_lm.inference.config import GenerationConfig  # noqa: E402
from mqa_lm.kernels.triton.decode import check_decode_inputs, decode_attention, split_plan  # noqa: E402


def reference64(q, k, v, *, scale, lengths=None, key_mask=None, bias=None):
    """One query per row over the cache, float64, from the definition: K/V repeated per query head,
    keys past the row's length or masked out get no weight, a row with no key gives zeros."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads, max_len = q.shape[1], k.shape[1], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) * scale  # [b, h, 1, max_len]
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones(q.shape[0], max_len, dtype=torch.bool)
    if lengths is not None:
        allowed &= torch.arange(max_len)[None, :] < lengths[:, None]
    if key_mask is not None:
        allowed &= key_mask
    allowed = allowed[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    seen = allowed.any(-1, keepdim=True)
    return (torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen) @ v


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def inputs(batch, heads, kv_heads, max_len, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    return q, k, v


def run(q, k, v, **kwargs):
    out = torch.full_like(q, float("nan"))  # every element must be written
    got = decode_attention(q, k, v, out=out, **kwargs)
    assert got is out
    return got


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (6, 2), (3, 3), (20, 1)], ids=["mqa", "gqa", "mha", "mqa20"])
@pytest.mark.parametrize("extra", ["", "lengths", "mask", "bias", "lengths+mask+bias"])
def test_matches_float64(heads, kv_heads, extra):
    q, k, v = inputs(3, heads, kv_heads, 101, 24, seed=heads + kv_heads)
    gen = torch.Generator().manual_seed(7)
    kwargs = {}
    if "lengths" in extra:
        kwargs["lengths"] = torch.tensor([101, 37, 1])
    if "mask" in extra:
        kwargs["key_mask"] = torch.rand(3, 101, generator=gen) > 0.3
    if "bias" in extra:
        slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(heads)])
        kwargs["bias"] = (slopes[:, None] * (torch.arange(101) - 100.0)).reshape(1, heads, 1, 101)
    scale = 0.29
    got = run(q, k, v, softmax_scale=scale, **kwargs)
    want = reference64(q, k, v, scale=scale, **kwargs)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("split_size", [16, 48, 200])
def test_split_sizes(split_size):
    q, k, v = inputs(2, 8, 2, 157, 32, seed=3)
    lengths = torch.tensor([157, 70])
    bias = torch.randn(2, 8, 1, 157, generator=torch.Generator().manual_seed(1))
    got = run(q, k, v, lengths=lengths, bias=bias, split_size=split_size)
    size, n_splits, _ = split_plan(2, 2, 8, 157, q.device, split_size)
    assert size % 16 == 0 and n_splits == math.ceil(157 / size)
    assert rel_err(got, reference64(q, k, v, scale=32**-0.5, lengths=lengths, bias=bias)) < 1e-5


@pytest.mark.parametrize("split_size", [None, 48], ids=["splits", "one-split"])
def test_rows_with_no_key_are_zero_and_strided_inputs_work(split_size):
    """Also with one split, where the split kernel writes the output itself (no combine)."""
    q, k, v = inputs(3, 4, 1, 45, 16, seed=4)
    mask = torch.ones(3, 45, dtype=torch.bool)
    mask[1] = False  # every key masked
    lengths = torch.tensor([45, 45, 0])  # no key at all
    # q as a transposed view and a stride-0 bias over batch, as the engine passes them.
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    bias = torch.randn(1, 4, 1, 45).expand(3, 4, 1, 45)
    got = run(q_t, k, v, lengths=lengths, key_mask=mask, bias=bias, split_size=split_size)
    assert split_plan(3, 1, 4, 45, q.device, split_size)[1] == (1 if split_size else 2)
    assert torch.equal(got[1:], torch.zeros_like(got[1:]))
    assert rel_err(got[:1], reference64(q[:1], k[:1], v[:1], scale=0.25, bias=bias[:1])) < 1e-5


def test_fp16_and_head_dim_padding():
    q, k, v = inputs(2, 4, 2, 77, 40, dtype=torch.float16, seed=5)
    got = run(q, k, v, lengths=torch.tensor([77, 50]))
    assert rel_err(got, reference64(q, k, v, scale=40**-0.5, lengths=torch.tensor([77, 50]))) < 2e-3


def test_bad_inputs():
    q, k, v = inputs(2, 4, 2, 16, 16)
    with pytest.raises(ValueError, match="one query token per row"):
        check_decode_inputs(torch.randn(2, 4, 2, 16), k, v, None, None, None)
    with pytest.raises(ValueError, match="multiple of kv_heads=3"):
        check_decode_inputs(q, torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), None, None, None)
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor \[batch=2\]"):
        check_decode_inputs(q, k, v, torch.tensor([1.0, 2.0]), None, None)
    with pytest.raises(ValueError, match=r"key_mask must be bool \[batch=2, max_len=16\]"):
        check_decode_inputs(q, k, v, None, torch.ones(2, 15, dtype=torch.bool), None)
    with pytest.raises(TypeError, match="not bf16"):
        check_decode_inputs(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, None)
    with pytest.raises(ValueError, match="broadcastable to"):
        check_decode_inputs(q, k, v, None, None, torch.zeros(1, 4, 1, 15))


# The engine tests' prompts: the interpreter runs each program of each decode step (~25 ms each), so
# the prompt fills most of the first split (32 keys here) and a few steps cross into the second.
PROMPT, NEW_TOKENS = 28, 12


def prompt_across_a_split() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of PROMPT tokens, the second left-padded by 5, for a cache of 64 slots: the decode
    steps read 29 to 39 keys, first with the second split empty, then with both."""
    assert split_plan(2, 1, 4, 64, torch.device("cpu"))[:2] == (32, 2)
    assert PROMPT < 32 < PROMPT + NEW_TOKENS - 1
    idx = torch.randint(0, 64, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, PROMPT, dtype=torch.bool)
    mask[1, :5] = False  # a left-padded row
    return idx, mask


@pytest.mark.parametrize("pos_emb,kv_heads", [("alibi", 1), ("rope", 2), ("learned", 4)])
def test_engine_on_the_kernel_equals_engine_on_sdpa(pos_emb, kv_heads):
    torch.manual_seed(0)
    model = MQATransformer(
        MQAConfig(
            vocab_size=64,
            max_seq_len=64,
            n_layers=2,
            d_model=32,
            heads=4,
            kv_heads=kv_heads,
            attn_impl="torch",
            pos_emb=pos_emb,
            init_std=0.3,
        )
    ).eval()
    idx, mask = prompt_across_a_split()
    runs = {}
    for attention in ("triton", "sdpa"):
        engine = InferenceEngine(model, batch_size=2, max_len=64, attention=attention, keep_logits=True)
        assert engine.attention == attention
        out = engine.generate(idx, GenerationConfig(NEW_TOKENS, temperature=0.0), prompt_mask=mask)
        runs[attention] = (out, engine.step_logits[:NEW_TOKENS].clone())
    assert torch.equal(runs["triton"][0], runs["sdpa"][0])
    torch.testing.assert_close(runs["triton"][1], runs["sdpa"][1], rtol=1e-5, atol=1e-5)


# ---- the fused linear layers of a decode step (mqa_lm.kernels.triton.decode_linear) -------------


def fused_reference64(x, weight, bias, norm, norm_weight, norm_bias, activation, residual):
    """norm -> linear -> activation -> residual add, in float64 from the definitions."""
    x = x.double()
    if norm == "layernorm":
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        x = x * norm_weight.double() + (0 if norm_bias is None else norm_bias.double())
    elif norm == "rmsnorm":
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight.double()
    y = x @ weight.double().T + (0 if bias is None else bias.double())
    if activation == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    elif activation == "swiglu":
        gate, up = y.chunk(2, dim=-1)
        y = gate * torch.sigmoid(gate) * up
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("norm", ["none", "layernorm", "rmsnorm"])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "swiglu"])
def test_fused_linear_matches_float64(rows, norm, activation):
    from mqa_lm.kernels.triton.decode_linear import fused_linear

    gen = torch.Generator().manual_seed(rows * 7 + len(norm) + len(activation))
    # K and N not multiples of the interpreter's 32/16 tiles: the last tiles are partial.
    for in_features, out_features, with_bias in ((40, 48, True), (72, 20, False)):
        x = torch.randn(1, rows, in_features, generator=gen) * 3 + 1
        weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
        bias = torch.randn(out_features, generator=gen) if with_bias else None
        norm_weight = torch.rand(in_features, generator=gen) + 0.5
        norm_bias = torch.randn(in_features, generator=gen) if norm == "layernorm" and with_bias else None
        width = out_features // 2 if activation == "swiglu" else out_features
        residual = torch.randn(1, rows, width, generator=gen) if with_bias else None
        kwargs = {} if norm == "none" else {"norm": norm, "norm_weight": norm_weight, "norm_bias": norm_bias}
        out = fused_linear(x, weight, bias, activation=activation, residual=residual, **kwargs)
        assert out.shape == (1, rows, width) and out.dtype == x.dtype
        expected = fused_reference64(x, weight, bias, norm, norm_weight, norm_bias, activation, residual)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_fused_linear_writes_keys_and_values_into_the_cache_at_the_slot():
    from mqa_lm.kernels.triton.decode_linear import fused_linear

    gen = torch.Generator().manual_seed(3)
    rows, dim, kv_heads, head_dim, max_len = 3, 32, 2, 8, 11
    width = dim + 2 * kv_heads * head_dim
    x, weight = torch.randn(rows, 1, dim, generator=gen), torch.randn(width, dim, generator=gen)
    kv = torch.randn(rows, 2, kv_heads, max_len, head_dim, generator=gen)
    before = kv.clone()
    out = fused_linear(x, weight, norm="rmsnorm", norm_weight=torch.ones(dim), kv_cache=kv, slot=torch.tensor([5]))
    expected = out[:, 0, dim:].view(rows, 2, kv_heads, head_dim)
    assert torch.equal(kv[:, :, :, 5], expected)
    before[:, :, :, 5] = expected
    assert torch.equal(kv, before)  # nothing else written
    with pytest.raises(ValueError, match=r"kv_cache must be \[3, 2, kv_heads, max_len, head_dim\]"):
        fused_linear(x, weight, kv_cache=kv[:2], slot=torch.tensor([5]))


def test_fused_linear_refuses_more_rows_than_a_tile():
    from mqa_lm.kernels.triton.decode_linear import MAX_ROWS, fused_linear

    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows, got {MAX_ROWS + 1}"):
        fused_linear(torch.zeros(MAX_ROWS + 1, 8), torch.zeros(16, 8))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pos_emb="learned", norm_type="layernorm", mlp_type="gelu"),
        dict(pos_emb="rope", norm_type="rmsnorm", mlp_type="swiglu", bias=False, qk_ln=True, clip_qkv=0.5),
        dict(pos_emb="alibi", norm_type="low_precision_layernorm", kv_heads=2),
    ],
)
def test_engine_with_fused_layers_equals_the_unfused_layers(overrides):
    """The decode step on the fused kernels gives the tokens and logits of the same step on the
    model's own modules (both on the Triton attention), for each norm, MLP and position type."""
    torch.manual_seed(0)
    config = dict(vocab_size=64, max_seq_len=64, n_layers=2, d_model=32, heads=4, kv_heads=1, init_std=0.3)
    model = MQATransformer(MQAConfig(**{**config, "attn_impl": "torch", **overrides})).eval()
    idx, mask = prompt_across_a_split()
    runs = {}
    for fused in (True, False):
        engine = InferenceEngine(model, batch_size=2, max_len=64, attention="triton", keep_logits=True)
        assert engine.cache.fused_layers  # the default wherever the Triton decode kernel runs
        engine.cache.fused_layers = fused
        x = torch.zeros(2, 1, 32)
        with torch.no_grad():
            assert model.blocks[0].fused_decode_ok(x, engine.cache.layers[0]) is fused
        out = engine.generate(idx, GenerationConfig(NEW_TOKENS, temperature=0.0), prompt_mask=mask)
        runs[fused] = (out, engine.step_logits[:NEW_TOKENS].clone())
    assert torch.equal(runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pos_emb="learned", norm_type="layernorm", mlp_type="gelu"),
        dict(pos_emb="rope", norm_type="rmsnorm", mlp_type="swiglu", bias=False, kv_heads=2),
    ],
)
def test_the_warm_up_launches_are_the_steps_fused_kernels_and_write_nothing(overrides, monkeypatch):
    """The engine's decode warm-up runs ``model.fused_decode_launches`` side by side on threads: its
    calls must be the fused kernels one decode step launches, with everything that picks a kernel's
    compiled variant alike (the tensors given, norm, activation, shapes, strides, dtypes), and they
    must not touch the cache a prefill may be writing meanwhile."""
    from mqa_lm.kernels.triton import decode_linear

    torch.manual_seed(0)
    config = dict(vocab_size=64, max_seq_len=64, n_layers=2, d_model=32, heads=4, kv_heads=1, attn_impl="torch")
    model = MQATransformer(MQAConfig(**{**config, **overrides})).eval()
    engine = InferenceEngine(model, batch_size=2, max_len=32, attention="triton")
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    engine.generate(idx, GenerationConfig(1))  # the prefill alone: a filled cache, no fused launch

    launched: list[tuple] = []
    real = decode_linear.fused_linear

    def recording(x, weight, bias=None, **kwargs):
        def layout(t):
            return None if t is None else (tuple(t.shape), t.stride(), t.dtype)

        given = {k: layout(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        launched.append((layout(x), layout(weight), layout(bias), tuple(sorted(given.items()))))
        return real(x, weight, bias, **kwargs)

    monkeypatch.setattr(decode_linear, "fused_linear", recording)
    cache = engine.cache
    before = [t.clone() for t in (*(layer.kv for layer in cache.layers), cache.key_mask, cache.slot)]
    warm_up = model.fused_decode_launches(cache)
    assert len(warm_up) == 5  # a block's four kernels and the head's
    for call in warm_up:
        call()
    after = [*(layer.kv for layer in cache.layers), cache.key_mask, cache.slot]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    warmed = set(launched)
    launched.clear()
    engine.generate(idx, GenerationConfig(2))  # the prefill, then one decode step
    assert len(launched) == 4 * 2 + 1
    assert set(launched) == warmed
