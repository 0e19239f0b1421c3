"""MultiQueryAttention against the fp64 reference in mqa_reference.py, on every CPU attn_impl.

The block is run in float64 (module.double(), float64 x) so parity is checked to ~1e-10, which
leaves no room for a wrong mask/bias/scale/grouping to hide inside a loose tolerance.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from mqa_reference import press_alibi_slopes, ref_block, ref_layernorm, ref_rmsnorm

from mqa_lm import MultiQueryAttention
from mqa_lm.kernels import ATTENTION_BACKENDS, AttentionBackend
from mqa_lm.nn import NORMS, build_norm

CPU_IMPLS = ["torch", "triton", "auto"]
NORM_TYPES = ["layernorm", "low_precision_layernorm", "rmsnorm", "low_precision_rmsnorm"]
F64_TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    # 'triton' must take its CPU fallback here; the interpreted kernels are the Triton tests' job.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def make_block(
    impl: str = "torch",
    *,
    dim: int = 32,
    heads: int = 4,
    kv_heads: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    **kwargs,
) -> MultiQueryAttention:
    """A block with random (not default-initialised) biases and norm gains, so they all matter."""
    torch.manual_seed(seed)
    block = MultiQueryAttention(dim=dim, heads=heads, kv_heads=kv_heads, attn_impl=impl, **kwargs).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return block.eval()


# ---- the seed usage ----------------------------------------------------------------------------


def test_seed_usage_runs_as_written():
    import torch

    from mqa_lm import MultiQueryAttention

    attention_layer = MultiQueryAttention(dim=512, heads=8, attn_impl="torch")
    x = torch.rand(16, 10, 512)
    output, attn_weights, _ = attention_layer(x)

    assert output.shape == (16, 10, 512)
    assert attn_weights is None
    expected, _, _ = ref_block(attention_layer, x)
    torch.testing.assert_close(output.double(), expected, rtol=1e-4, atol=1e-5)


# ---- parity with the fp64 reference -----------------------------------------------------------

B, S, PAST = 2, 5, 4


def _mask(k_len: int, empty_row: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, k_len, generator=g) > 0.35
    mask[:, -1] = True  # every causal query keeps some key unless a row is emptied on purpose
    if empty_row:
        mask[1] = False
    return mask


def _bias(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


# name -> (constructor kwargs, function (heads, kv_heads, head_dim) -> forward kwargs)
CASES = {
    "causal": ({}, lambda h, kvh, d: dict(causal=True)),
    "noncausal": ({}, lambda h, kvh, d: dict(causal=False)),
    "mask_causal": ({}, lambda h, kvh, d: dict(mask=_mask(S))),
    "mask_int_noncausal": ({}, lambda h, kvh, d: dict(mask=_mask(S).int(), causal=False)),
    "mask_empty_row": ({}, lambda h, kvh, d: dict(mask=_mask(S, empty_row=True), causal=False)),
    "bias_full": ({}, lambda h, kvh, d: dict(bias=_bias(B, h, S, S))),
    "bias_longer_cropped": ({}, lambda h, kvh, d: dict(bias=_bias(1, h, S + 3, S + 6))),
    "bias_alibi_row": ({}, lambda h, kvh, d: dict(bias=_bias(1, h, 1, S + 2), causal=False)),
    "bias_2d": ({}, lambda h, kvh, d: dict(bias=_bias(S, S))),
    "cache_causal": ({}, lambda h, kvh, d: dict(past_key_value=_past(kvh, d))),
    "cache_mask_bias": (
        {},
        lambda h, kvh, d: dict(
            past_key_value=_past(kvh, d), mask=_mask(PAST + S), bias=_bias(1, h, S + 1, PAST + S + 3)
        ),
    ),
    "cache_noncausal": ({}, lambda h, kvh, d: dict(past_key_value=_past(kvh, d), causal=False)),
    "clip_qkv": (dict(clip_qkv=0.25), lambda h, kvh, d: dict(mask=_mask(S))),
    "softmax_scale": (dict(softmax_scale=0.77), lambda h, kvh, d: dict(bias=_bias(1, h, S, S))),
    "rope": (dict(rope_theta=500.0), lambda h, kvh, d: dict(past_key_value=_past(kvh, d))),
    **{
        f"qk_ln_{norm}": (dict(qk_ln=True, norm_type=norm), lambda h, kvh, d: dict(mask=_mask(S)))
        for norm in NORM_TYPES
    },
}


def _past(kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(B, kv_heads, PAST, head_dim, generator=g, dtype=torch.float64) for _ in range(2))


@pytest.mark.parametrize("needs_weights", [False, True])
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_matches_fp64_reference(case, kv_heads, impl, needs_weights):
    ctor, make_inputs = CASES[case]
    block = make_block(impl, kv_heads=kv_heads, **ctor)
    inputs = make_inputs(4, kv_heads, 8)
    x = torch.randn(B, S, 32, dtype=torch.float64)

    out, weights, (k, v) = block(x, needs_weights=needs_weights, **inputs)
    ref_out, ref_probs, (ref_k, ref_v) = ref_block(
        block,
        x,
        softmax_scale=ctor.get("softmax_scale"),
        past=inputs.get("past_key_value"),
        bias=inputs.get("bias"),
        mask=inputs.get("mask"),
        causal=inputs.get("causal", True),
    )

    torch.testing.assert_close(out, ref_out, **F64_TOL)
    torch.testing.assert_close(k, ref_k, **F64_TOL)
    torch.testing.assert_close(v, ref_v, **F64_TOL)
    assert k.shape == (B, kv_heads, ref_k.shape[2], 8)
    if needs_weights:
        assert weights.shape == (B, 4, S, ref_k.shape[2])
        torch.testing.assert_close(weights, ref_probs, **F64_TOL)
    else:
        assert weights is None


def test_empty_key_row_gives_zero_context():
    block = make_block(bias=False)
    x = torch.randn(B, S, 32, dtype=torch.float64)
    out, weights, _ = block(x, mask=_mask(S, empty_row=True), causal=False, needs_weights=True)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(weights[1]) == 0
    assert torch.count_nonzero(out[0]) > 0


def test_clip_qkv_actually_clamps():
    clipped = make_block(clip_qkv=0.25)
    x = 3 * torch.randn(B, S, 32, dtype=torch.float64)
    raw = x @ clipped.Wqkv.weight.T + clipped.Wqkv.bias
    assert (raw.abs() > 0.25).float().mean() > 0.5, "the test input must drive q/k/v past the clip"

    out, _, (k, v) = clipped(x)
    assert k.abs().max() <= 0.25 and v.abs().max() <= 0.25
    torch.testing.assert_close(out, ref_block(clipped, x)[0], **F64_TOL)
    clipped.clip_qkv = None
    unclipped, _, _ = ref_block(clipped, x)
    assert (out - unclipped).abs().max() > 1e-2


def test_softmax_scale_default_and_custom_differ():
    x = torch.randn(B, S, 32, dtype=torch.float64)
    default, custom = make_block(), make_block(softmax_scale=2.0)
    assert (default(x)[0] - custom(x)[0]).abs().max() > 1e-3
    torch.testing.assert_close(default(x)[0], ref_block(default, x, softmax_scale=1 / math.sqrt(8))[0], **F64_TOL)


# ---- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("needs_weights", [False, True])
@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gradients_match_reference(impl, kv_heads, needs_weights):
    block = make_block(impl, kv_heads=kv_heads, qk_ln=True, norm_type="rmsnorm", rope_theta=100.0)
    x = torch.randn(B, S, 32, dtype=torch.float64, requires_grad=True)
    bias = _bias(1, 4, S, PAST + S).requires_grad_()
    past = tuple(t.requires_grad_() for t in _past(kv_heads, 8))
    mask = _mask(PAST + S)
    g_out = torch.randn(B, S, 32, dtype=torch.float64)
    g_w = torch.randn(B, 4, S, PAST + S, dtype=torch.float64)
    leaves = [x, bias, *past, *block.parameters()]

    def grads(out, weights):
        loss = (out * g_out).sum() + ((weights * g_w).sum() if needs_weights else 0)
        return torch.autograd.grad(loss, leaves)

    out, weights, _ = block(x, past_key_value=past, bias=bias, mask=mask, needs_weights=needs_weights)
    ref_out, ref_probs, _ = ref_block(block, x, past=past, bias=bias, mask=mask)
    for got, want in zip(grads(out, weights), grads(ref_out, ref_probs)):
        torch.testing.assert_close(got, want, **F64_TOL)


@pytest.mark.parametrize("needs_weights", [False, True])
def test_gradcheck_small(needs_weights):
    block = make_block("torch", dim=8, heads=2, kv_heads=1)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, True]])

    def f(x, bias):
        out, weights, _ = block(x, bias=bias, mask=mask, needs_weights=needs_weights)
        return (out, weights) if needs_weights else out

    assert torch.autograd.gradcheck(f, (x, bias))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bf16_alibi_bias_keeps_its_precision_on_long_rows(impl):
    # Aligned to the newest key, an ALiBi row reaches -slope * seq for the early queries; in bf16
    # that is whole units unless the backend re-centres each row before casting the bias.
    heads, seq = 8, 512
    block = make_block(impl, dim=128, heads=heads, dtype=torch.bfloat16)
    x = torch.randn(2, seq, 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    slopes = torch.tensor(press_alibi_slopes(heads))
    bias = (slopes[:, None] * torch.arange(1 - seq - 64, 1.0)[None, :])[None, :, None, :]
    out, _, _ = block(x, bias=bias, mask=torch.ones(2, seq, dtype=torch.bool))
    want, _, _ = ref_block(block, x, bias=bias)
    assert ((out.double() - want).norm() / want.norm()).item() <= 1e-2


# ---- incremental decoding equals the full forward ------------------------------------------------

INC_HEADS, INC_DIM, INC_SEQ, INC_MAX = 8, 64, 12, 16


def _alibi_style_bias() -> torch.Tensor:
    """[1, heads, 1, INC_MAX]: -slope * distance to the newest key of INC_MAX; the block crops it."""
    slopes = torch.tensor(press_alibi_slopes(INC_HEADS))
    return (slopes[:, None] * torch.arange(1 - INC_MAX, 1.0)[None, :])[None, :, None, :]


@pytest.mark.parametrize("needs_weights", [False, True])
@pytest.mark.parametrize("chunks", [[1] * INC_SEQ, [5, 1, 3, 3], [2, 7, 1, 2]], ids=["tokens", "chunks_a", "chunks_b"])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_block_incremental_equals_full(impl, chunks, needs_weights):
    block = make_block(impl, dim=INC_DIM, heads=INC_HEADS, kv_heads=2, dtype=torch.float32)
    torch.manual_seed(4)
    x = torch.randn(3, INC_SEQ, INC_DIM)
    mask = torch.ones(3, INC_SEQ, dtype=torch.bool)
    mask[1, :3] = False  # left padding: its first queries see no key at all
    mask[2, 5] = False
    bias = _alibi_style_bias()

    full, full_w, (full_k, full_v) = block(x, bias=bias, mask=mask, needs_weights=needs_weights)
    cache, start = None, 0
    for n in chunks:
        end = start + n
        out, w, cache = block(
            x[:, start:end], past_key_value=cache, bias=bias, mask=mask[:, :end], needs_weights=needs_weights
        )
        assert (out - full[:, start:end]).abs().max() <= 1e-5
        if needs_weights:
            assert (w - full_w[:, :, start:end, :end]).abs().max() <= 1e-5
            assert torch.count_nonzero(full_w[:, :, start:end, end:]) == 0
        start = end
    assert (cache[0] - full_k).abs().max() <= 1e-5 and (cache[1] - full_v).abs().max() <= 1e-5


# ---- errors, warnings, device, dropout ----------------------------------------------------------


def test_flash_on_cpu_says_use_torch():
    block = make_block("flash", dtype=torch.float32)
    x = torch.randn(B, S, 32)
    for needs_weights in (False, True):
        with pytest.raises(ValueError, match=r"attn_impl='flash'.*CUDA.*attn_impl='torch'"):
            block(x, needs_weights=needs_weights)


def test_te_without_transformer_engine_says_how_to_install():
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TransformerEngine is installed here")
    with pytest.raises(ImportError, match=r"fc_type='te'.*pip install .*transformer_engine.*fc_type='torch'"):
        MultiQueryAttention(dim=32, heads=4, fc_type="te")


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(dim=30, heads=4), ValueError, r"dim=30 is not divisible by heads=4"),
        (dict(dim=32, heads=8, kv_heads=3), ValueError, r"heads=8 is not divisible by kv_heads=3"),
        (dict(dim=32, heads=4, kv_heads=0), ValueError, r"kv_heads must be an integer >= 1, got 0"),
        (dict(dim=32.0, heads=4), TypeError, r"dim must be an integer >= 1, got 32.0"),
        (
            dict(dim=32, heads=4, attn_impl="xformers"),
            ValueError,
            r"unknown attn_impl 'xformers'; valid choices are: auto, flash, torch, triton",
        ),
        (
            dict(dim=32, heads=4, norm_type="batchnorm"),
            ValueError,
            r"unknown norm_type 'batchnorm'; valid choices are: layernorm, low_precision_layernorm, "
            r"low_precision_rmsnorm, rmsnorm",
        ),
        (dict(dim=32, heads=4, fc_type="keras"), ValueError, r"unknown fc_type 'keras'; valid choices are: te, torch"),
        (dict(dim=32, heads=4, clip_qkv=0), ValueError, r"clip_qkv must be > 0.*got 0"),
        (dict(dim=32, heads=4, clip_qkv=-1.5), ValueError, r"clip_qkv must be > 0.*got -1.5"),
        (dict(dim=32, heads=4, attn_pdrop=1.0), ValueError, r"attn_pdrop must be in \[0, 1\), got 1.0"),
        (dict(dim=32, heads=4, attn_pdrop=-0.1), ValueError, r"attn_pdrop must be in \[0, 1\), got -0.1"),
        (dict(dim=32, heads=4, softmax_scale=0.0), ValueError, r"softmax_scale must be > 0.*got 0.0"),
        (dict(dim=32, heads=4, verbose=3), ValueError, r"verbose must be 0, 1 or 2, got 3"),
        (dict(dim=32, heads=4, rope_theta=-1.0), ValueError, r"rope_theta must be > 0, got -1.0"),
        (dict(dim=36, heads=4, rope_theta=10000.0), ValueError, r"even head_dim.*9"),
    ],
)
def test_invalid_constructor_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        MultiQueryAttention(**kwargs)


def _past32(batch=B, kv_heads=1, length=PAST, head_dim=8):
    return torch.zeros(batch, kv_heads, length, head_dim), torch.zeros(batch, kv_heads, length, head_dim)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(x=torch.randn(S, 32)), ValueError, r"x must have shape \[batch, seq, 32\], got \[5, 32\]"),
        (dict(x=torch.randn(B, S, 16)), ValueError, r"x must have shape \[batch, seq, 32\], got \[2, 5, 16\]"),
        (dict(x=torch.ones(B, S, 32, dtype=torch.long)), TypeError, r"floating-point.*torch.int64"),
        (dict(x=[[0.0] * 32]), TypeError, r"x must be a torch.Tensor.*list"),
        (
            dict(x=torch.randn(B, S, 32, dtype=torch.float16)),
            TypeError,
            r"x has dtype torch.float16 but this MultiQueryAttention's weights are torch.float32; pass "
            r"x.to\(torch.float32\), convert the module with .to\(torch.float16\), or run under torch.autocast",
        ),
        (
            dict(mask=torch.ones(B, S + 1, dtype=torch.bool)),
            ValueError,
            r"mask must have shape \[batch=2, keys=5\].*got \[2, 6\]",
        ),
        (
            dict(mask=torch.ones(B, S, dtype=torch.bool), past_key_value=_past32()),
            ValueError,
            r"mask must have shape \[batch=2, keys=9\] \(keys include cached positions\), got \[2, 5\]",
        ),
        (dict(mask=torch.ones(B, S)), TypeError, r"mask must be bool or integer.*torch.float32.*as bias"),
        (dict(bias=torch.zeros(1, 3, S, S)), ValueError, r"bias of shape \[1, 3, 5, 5\] does not broadcast.*heads=4"),
        (dict(bias=torch.zeros(1, 4, S - 1, S)), ValueError, r"bias of shape \[1, 4, 4, 5\].*queries=5"),
        (
            dict(bias=torch.zeros(1, 4, S, S), past_key_value=_past32()),
            ValueError,
            r"bias of shape \[1, 4, 5, 5\].*keys=9",
        ),
        (dict(bias=torch.zeros(3, 4, S, S)), ValueError, r"bias of shape \[3, 4, 5, 5\].*batch=2"),
        (dict(bias=torch.zeros(1, 1, 1, S, S)), ValueError, r"bias must be broadcastable.*\[1, 1, 1, 5, 5\]"),
        (dict(bias=torch.zeros(1, 4, S, S, dtype=torch.long)), TypeError, r"bias must be a floating-point.*int64"),
        (dict(bias=torch.zeros(1, 4, S, S, dtype=torch.bool)), TypeError, r"bias must be a floating-point.*bool"),
        (
            dict(past_key_value=_past32(kv_heads=2)),
            ValueError,
            r"past_key_value key must have shape \[batch=2, kv_heads=1, past_len, head_dim=8\], got \[2, 2, 4, 8\]",
        ),
        (dict(past_key_value=_past32(head_dim=4)), ValueError, r"head_dim=8\], got \[2, 1, 4, 4\]"),
        (dict(past_key_value=_past32(batch=3)), ValueError, r"batch=2.*got \[3, 1, 4, 8\]"),
        (
            dict(past_key_value=(torch.zeros(B, 1, 4, 8), torch.zeros(B, 1, 3, 8))),
            ValueError,
            r"past key \[2, 1, 4, 8\] and value \[2, 1, 3, 8\] shapes differ",
        ),
        (dict(past_key_value=(torch.zeros(B, 1, 4, 8),)), TypeError, r"past_key_value must be a \(key, value\) pair"),
        (dict(past_key_value=(torch.zeros(B, 1, 4, 8), None)), TypeError, r"past_key_value value must be a tensor"),
    ],
)
def test_invalid_forward_arguments(kwargs, error, pattern):
    block = make_block(dtype=torch.float32)
    x = kwargs.pop("x", torch.randn(B, S, 32))
    with pytest.raises(error, match=pattern):
        block(x, **kwargs)


def test_autocast_takes_other_input_dtypes():
    """Under autocast the dtype check stands aside: the matmuls cast, as in mixed-precision training."""
    block = make_block(dtype=torch.float32)
    x = torch.randn(B, S, 32)
    expected = block(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block(x.bfloat16())[0]
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_triton_on_cpu_falls_back_and_warns_once_per_reason():
    block = make_block("triton", dtype=torch.float32, verbose=1)
    x = torch.randn(B, S, 32)
    with pytest.warns(UserWarning, match=r"attn_impl='triton' falls back to 'torch'"):
        out, _, _ = block(x)
    torch.testing.assert_close(out.double(), ref_block(block, x)[0], rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(x)  # same reason: no second warning
    with pytest.warns(UserWarning, match=r"needs_weights=True runs on the reference math path"):
        block(x, needs_weights=True)


@pytest.mark.parametrize("impl", CPU_IMPLS + ["flash"])
def test_verbose_zero_is_silent(impl):
    block = make_block(impl, dtype=torch.float32, verbose=0)
    x = torch.randn(B, S, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if impl == "flash":
            with pytest.raises(ValueError):
                block(x)
        else:
            block(x)
            block(x, needs_weights=True, mask=_mask(S))


@pytest.mark.parametrize("impl, kernel", [("torch", "torch"), ("auto", "torch"), ("triton", "torch")])
def test_verbose_two_logs_the_kernel(impl, kernel, caplog):
    block = make_block(impl, dtype=torch.float32, verbose=2)
    x = torch.randn(B, S, 32)
    with caplog.at_level(logging.INFO, logger="mqa_lm.attention"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block(x)
        block(x, needs_weights=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "mqa_lm.attention"]
    assert len(messages) == 2
    assert f"{kernel} kernel" in messages[0] and "reference kernel" in messages[1]


def test_verbose_one_does_not_log_kernels(caplog):
    block = make_block("torch", dtype=torch.float32, verbose=1)
    with caplog.at_level(logging.INFO, logger="mqa_lm.attention"):
        block(torch.randn(B, S, 32))
    assert not [r for r in caplog.records if r.name == "mqa_lm.attention"]


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_parameters_are_created_on_the_given_device(kv_heads):
    block = MultiQueryAttention(
        dim=32, heads=4, kv_heads=kv_heads, qk_ln=True, norm_type="rmsnorm", rope_theta=10000.0, device="meta"
    )
    tensors = list(block.parameters()) + list(block.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert block.Wqkv.weight.shape == (32 + 2 * kv_heads * 8, 32)
    assert block.out_proj.weight.shape == (32, 32)
    assert block.k_ln.weight.shape == (kv_heads * 8,)
    cpu = MultiQueryAttention(dim=32, heads=4, device=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in cpu.parameters())


@pytest.mark.parametrize("needs_weights", [False, True])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_attention_dropout_only_in_training(impl, needs_weights):
    block = make_block(impl, dtype=torch.float32, attn_pdrop=0.5)
    reference = make_block(impl, dtype=torch.float32)  # same seed: same weights, no dropout
    x = torch.randn(B, S, 32)
    kwargs = dict(needs_weights=needs_weights, causal=False)

    block.train()
    torch.manual_seed(10)
    first, w1, _ = block(x, **kwargs)
    second, _, _ = block(x, **kwargs)
    torch.manual_seed(10)
    again, _, _ = block(x, **kwargs)
    assert (first - second).abs().max() > 1e-3, "dropout must differ between calls"
    torch.testing.assert_close(first, again)  # and follow the seed
    assert (first - reference(x, **kwargs)[0]).abs().max() > 1e-3
    if needs_weights:  # the returned weights are the distribution before dropout
        torch.testing.assert_close(w1.sum(-1), torch.ones_like(w1.sum(-1)))

    block.eval()
    torch.testing.assert_close(block(x, **kwargs)[0], reference(x, **kwargs)[0])
    torch.testing.assert_close(block(x, **kwargs)[0], block(x, **kwargs)[0], rtol=0, atol=0)


# ---- norms ---------------------------------------------------------------------------------------


def _norm_pair(norm_type: str, dim: int = 24) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(5)
    norm = build_norm(norm_type, dim)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return norm, 3 * torch.randn(4, 7, dim) + 1


def test_norm_registry_is_complete():
    assert sorted(NORMS) == sorted(NORM_TYPES)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norms_match_fp64_formula(norm_type):
    norm, x = _norm_pair(norm_type)
    want = ref_rmsnorm(x, norm.weight) if "rms" in norm_type else ref_layernorm(x, norm.weight, norm.bias)
    got = norm(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.double()(x.double()), want, **F64_TOL)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_low_precision_norms_compute_in_autocast_dtype(kind):
    low, x = _norm_pair(f"low_precision_{kind}")
    full = build_norm(kind, x.shape[-1])
    full.load_state_dict(low.state_dict())

    torch.testing.assert_close(low(x), full(x), rtol=0, atol=0)  # no autocast: identical

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, full_out = low(x), full(x)
    assert got.dtype == torch.bfloat16 and full_out.dtype == torch.float32
    xb, wb = x.bfloat16(), low.weight.bfloat16()
    if kind == "layernorm":
        want = F.layer_norm(xb, (x.shape[-1],), wb, low.bias.bfloat16(), low.eps)
    else:
        want = xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + low.eps) * wb
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # bf16 arithmetic is measurably coarser than the fp32 twin, yet within bf16 accuracy of it.
    assert (got.float() - full_out).abs().max() > 0
    torch.testing.assert_close(got.float(), full_out, rtol=3e-2, atol=3e-2)


def test_rmsnorm_keeps_fp32_statistics_for_bf16_input():
    norm, x = _norm_pair("rmsnorm")
    got = norm(x.bfloat16())
    assert got.dtype == torch.bfloat16
    want = ref_rmsnorm(x.bfloat16().double(), norm.weight)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


# ---- one checker, named by the caller; the backend resolved once ----------------------------------


def test_checker_names_arguments_as_the_caller_says():
    from mqa_lm.nn.attention import check_attention_args

    args = dict(
        dim=30,
        heads=4,
        kv_heads=1,
        attn_impl="torch",
        clip_qkv=None,
        softmax_scale=None,
        attn_pdrop=0.0,
        norm_type="layernorm",
        fc_type="torch",
        verbose=0,
    )
    with pytest.raises(ValueError, match=r"^dim=30 is not divisible by heads=4; pick heads that divides dim$"):
        check_attention_args(**args)
    with pytest.raises(ValueError, match=r"^width=30 is not divisible by heads=4; pick heads that divides width$"):
        check_attention_args(**args, names={"dim": "width"})
    with pytest.raises(ValueError, match=r"^unknown cfg.impl 'x'; valid choices are: auto, flash, torch, triton"):
        check_attention_args(**{**args, "dim": 32, "attn_impl": "x"}, names={"attn_impl": "cfg.impl"})


def test_prechecked_builds_the_same_block_as_the_constructor():
    kwargs = dict(
        dim=32,
        heads=4,
        attn_impl="torch",
        clip_qkv=0.5,
        qk_ln=True,
        softmax_scale=None,
        attn_pdrop=0.0,
        norm_type="rmsnorm",
        fc_type="torch",
        verbose=0,
        device=None,
        kv_heads=2,
        rope_theta=100.0,
        bias=True,
    )
    torch.manual_seed(0)
    checked = MultiQueryAttention(**kwargs)
    torch.manual_seed(0)
    prechecked = MultiQueryAttention.prechecked(**kwargs)
    assert repr(checked) == repr(prechecked)
    state = prechecked.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in checked.state_dict().items())
    x = torch.randn(B, S, 32)
    torch.testing.assert_close(checked(x)[0], prechecked(x)[0], rtol=0, atol=0)


class CountingBackend(AttentionBackend):
    """The torch backend, counting how often the block asks it each question."""

    name = "counting"

    def __init__(self) -> None:
        self.torch = ATTENTION_BACKENDS.get("torch")
        self.device_checks, self.dtype_checks, self.call_checks, self.calls = 0, 0, 0, 0

    def check_device(self, device):
        self.device_checks += 1

    def unsupported_on(self, device, dtype):
        self.dtype_checks += 1
        return "no fp64 here" if dtype == torch.float64 else None

    def unsupported(self, q, k, *, causal, bias, key_padding_mask, dropout_p):
        self.call_checks += 1
        return "no masks here" if key_padding_mask is not None else None

    def __call__(self, q, k, v, **kwargs):
        self.calls += 1
        return self.torch(q, k, v, **kwargs)


@pytest.fixture
def counting_backend():
    backend = CountingBackend()
    ATTENTION_BACKENDS.register("counting")(backend)
    try:
        yield backend
    finally:
        del ATTENTION_BACKENDS._entries["counting"]  # keep the registry as other tests expect it


def test_backend_is_resolved_once_per_device_type_and_dtype(counting_backend):
    torch.manual_seed(0)
    block = make_block("counting", dtype=torch.float32)
    want_block = make_block("torch", dtype=torch.float32)
    x = torch.randn(B, S, 32)
    for _ in range(4):
        out, _, _ = block(x)
    torch.testing.assert_close(out, want_block(x)[0], rtol=0, atol=0)
    assert (counting_backend.device_checks, counting_backend.dtype_checks) == (1, 1)
    assert (counting_backend.call_checks, counting_backend.calls) == (4, 4)

    block(x, mask=_mask(S))  # a per-call reason: that call runs torch
    assert (counting_backend.call_checks, counting_backend.calls) == (5, 4)

    block.double()
    with pytest.warns(UserWarning, match="falls back to 'torch': no fp64 here"):
        block.verbose = 1
        block(x.double())
        block(x.double())
    # A new dtype is asked about once; a pair the backend refuses never reaches the per-call check.
    assert (counting_backend.device_checks, counting_backend.dtype_checks) == (1, 2)
    assert (counting_backend.call_checks, counting_backend.calls) == (5, 4)

    block.attn_impl = "torch"  # a new attn_impl is resolved afresh
    block.float()(x)
    assert counting_backend.calls == 4 and counting_backend.dtype_checks == 2


def test_every_layer_of_a_model_resolves_once(counting_backend):
    from mqa_lm import MQAConfig, MQATransformer

    model = MQATransformer(
        MQAConfig(vocab_size=16, max_seq_len=8, n_layers=3, d_model=32, heads=4, attn_impl="counting")
    ).eval()
    idx = torch.randint(0, 16, (2, 8))
    for _ in range(3):
        model(idx)
    assert (counting_backend.device_checks, counting_backend.dtype_checks) == (3, 3)
    assert counting_backend.calls == 9
