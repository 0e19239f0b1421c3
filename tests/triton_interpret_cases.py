"""Triton attention kernels under ``TRITON_INTERPRET=1`` on CPU tensors.

Not collected by a plain ``pytest`` run: the interpreter must be switched on before Triton is
imported, so ``tests/test_triton_attention.py`` runs this module in a subprocess with it set.
Shapes are tiny (the interpreter runs every program in Python) but odd, so every kernel sees
partial blocks, several row and key blocks, and packed GQA/MQA rows straddling blocks.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 set before Triton is imported"
)

from mqa_lm.kernels.triton.attention import triton_attention  # noqa: E402
from mqa_lm.kernels.triton.attention_launch import attention_backward, attention_forward  # noqa: E402
from mqa_lm.nn.attention import MultiQueryAttention  # noqa: E402


def reference64(q, k, v, *, scale, causal, bias=None, key_padding_mask=None):
    """Attention in float64, written out independently of the package: K/V heads repeated per
    query head, bottom-right causal, rows with no visible key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads = q.shape[1], k.shape[1]
    q_len, k_len = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    seen = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
    return probs @ v


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_inputs(batch, heads, kv_heads, q_len, k_len, head_dim, dtype, extra, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=gen).to(dtype)
    bias = mask = None
    if "alibi" in extra:
        slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(heads)])
        # [1, heads, 1, k_len]: stride-0 broadcast over batch and queries inside the kernel.
        bias = (slopes[:, None] * torch.arange(k_len)[None, :] / k_len).reshape(1, heads, 1, k_len).to(dtype)
    if "bias" in extra:
        bias = torch.randn(batch, 1, q_len, k_len, generator=gen).to(dtype)
    if "mask" in extra:
        mask = torch.rand(batch, k_len, generator=gen) > 0.3
        mask[:, -1] = True  # every row keeps a key under causal masking
    return q, k, v, bias, mask


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def check_against_reference(q, k, v, bias, mask, *, causal, scale=None, kv_splits=None):
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    batch, heads, q_len, head_dim = q.shape
    out, lse = attention_forward(q, k, v, softmax_scale=scale, causal=causal, bias=bias, key_padding_mask=mask)
    # A non-contiguous upstream gradient: a transposed view of a [b, q_len, heads, d] tensor.
    grad = torch.randn(batch, q_len, heads, 2 * head_dim)[..., ::2].transpose(1, 2).to(q.dtype)
    assert not grad.is_contiguous()
    dq, dk, dv = attention_backward(
        grad,
        q,
        k,
        v,
        out,
        lse,
        softmax_scale=scale,
        causal=causal,
        bias=bias,
        key_padding_mask=mask,
        kv_splits=kv_splits,
    )
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = reference64(q64, k64, v64, scale=scale, causal=causal, bias=bias, key_padding_mask=mask)
    want.backward(grad.double())
    tol = TOL[q.dtype]
    for name, got, ref in (("out", out, want), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert torch.isfinite(got).all(), name
        assert got.shape == ref.shape, name
        err = rel_err(got, ref)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (2, 2)], ids=["mqa", "gqa", "mha"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("extra", ["", "mask", "alibi", "bias+mask"])
def test_matches_float64_fp32(heads, kv_heads, causal, extra):
    q, k, v, bias, mask = make_inputs(2, heads, kv_heads, 37, 53, 32, torch.float32, extra)
    check_against_reference(q, k, v, bias, mask, causal=causal)


@pytest.mark.parametrize(
    "heads,kv_heads,causal,extra", [(4, 1, True, "mask"), (6, 2, False, "alibi"), (4, 1, True, "")]
)
def test_matches_float64_fp16(heads, kv_heads, causal, extra):
    q, k, v, bias, mask = make_inputs(2, heads, kv_heads, 37, 53, 32, torch.float16, extra, seed=1)
    check_against_reference(q, k, v, bias, mask, causal=causal)


@pytest.mark.parametrize("q_len,k_len", [(1, 53), (53, 53), (53, 37), (5, 70)])
def test_lengths_and_causal_alignment(q_len, k_len):
    # Decode (1 query), square, more queries than keys (the first rows see nothing) and a chunk.
    q, k, v, bias, mask = make_inputs(2, 4, 1, q_len, k_len, 16, torch.float32, "", seed=2)
    check_against_reference(q, k, v, bias, mask, causal=True, scale=0.37)


@pytest.mark.parametrize("head_dim", [24, 40])
def test_head_dim_padding(head_dim):
    q, k, v, bias, mask = make_inputs(1, 4, 2, 19, 29, head_dim, torch.float32, "mask", seed=3)
    check_against_reference(q, k, v, bias, mask, causal=True)


@pytest.mark.parametrize("kv_splits", [1, 3])
def test_dkdv_row_splits(kv_splits):
    # 8 query heads on one K/V head: 296 packed rows, so 3 splits give 3 chunks whose fp32 partial
    # dK/dV meet through atomic adds; 1 split writes them directly.
    q, k, v, bias, mask = make_inputs(2, 8, 1, 37, 53, 32, torch.float32, "bias+mask", seed=4)
    check_against_reference(q, k, v, bias, mask, causal=True, kv_splits=kv_splits)


def test_fully_padded_row_is_zero_with_finite_grads():
    q, k, v, _, _ = make_inputs(2, 4, 2, 9, 21, 16, torch.float32, "", seed=5)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1] = False  # batch 1 has no key at all
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = triton_attention(q, k, v, key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    check_against_reference(q.detach(), k.detach(), v.detach(), None, mask, causal=False)


def test_autograd_through_custom_op():
    q, k, v, bias, mask = make_inputs(2, 4, 1, 13, 17, 16, torch.float32, "alibi+mask", seed=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = triton_attention(*leaves, causal=True, bias=bias, key_padding_mask=mask, softmax_scale=0.3)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    reference64(*ref, scale=0.3, causal=True, bias=bias, key_padding_mask=mask).backward(grad.double())
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < 1e-5


def test_custom_op_registrations_pass_opcheck():
    from mqa_lm.kernels.triton import attention as ta

    q, k, v, bias, mask = make_inputs(1, 4, 2, 9, 11, 16, torch.float32, "mask", seed=7)
    q.requires_grad_()
    torch.library.opcheck(
        ta._fwd_op,
        (q, k, v, None, mask, 0.25, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def _block_pair(**kwargs):
    torch.manual_seed(0)
    ours = MultiQueryAttention(attn_impl="triton", verbose=2, **kwargs)
    ref = copy.deepcopy(ours).double()
    ref.attn_impl = "torch"
    return ours, ref


@pytest.mark.parametrize("kv_heads,causal,masked", [(1, True, False), (2, False, True), (1, True, True)])
def test_block_forward_backward(kv_heads, causal, masked, caplog):
    ours, ref = _block_pair(dim=64, heads=4, kv_heads=kv_heads)
    x = torch.randn(2, 23, 64)
    mask = None
    if masked:
        mask = torch.rand(2, 23) > 0.3
        mask[:, -1] = True
    with caplog.at_level(logging.INFO, logger="mqa_lm.attention"):
        out, _, _ = ours(x, mask=mask, causal=causal)
    assert "triton kernel" in caplog.text  # the kernel ran, not a fallback
    want, _, _ = ref(x.double(), mask=mask, causal=causal)
    assert rel_err(out, want) < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad.double())
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-5, name


def test_block_incremental_decoding_matches_full_forward():
    # Chunked prefill then one-token steps exercise bottom-right causal alignment with a cache.
    ours, _ = _block_pair(dim=64, heads=8, kv_heads=1, rope_theta=10000.0)
    ours.eval()
    x = torch.randn(1, 19, 64)
    with torch.no_grad():
        full, _, _ = ours(x)
        first, _, cache = ours(x[:, :11])
        steps = [first]
        for t in range(11, 19):
            step, _, cache = ours(x[:, t : t + 1], past_key_value=cache)
            steps.append(step)
    assert rel_err(torch.cat(steps, dim=1), full.double()) < 1e-5


def test_torch_compile_traces_through_the_op():
    # aot_eager runs Dynamo and AOTAutograd (fake tensors, the registered backward) without
    # needing a C++ toolchain; the kernels themselves then run as in eager mode.
    q, k, v, bias, mask = make_inputs(1, 4, 1, 11, 11, 16, torch.float32, "mask", seed=8)

    def loss(q, k, v):
        return (triton_attention(q, k, v, causal=True, key_padding_mask=mask) ** 2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(*eager).backward()
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("pos_emb", ["learned", "alibi"])
def test_model_compiles_as_one_graph_with_triton(pos_emb):
    # The whole training forward/backward, block routing and backend choice included, must trace
    # without a graph break (fullgraph=True raises on one), and compute what eager computes.
    from mqa_lm.model import MQAConfig, MQATransformer

    torch.manual_seed(0)
    config = MQAConfig(
        vocab_size=61, max_seq_len=24, n_layers=2, d_model=32, heads=4, kv_heads=1, attn_impl="triton", pos_emb=pos_emb
    )
    model = MQATransformer(config)
    x = torch.randint(0, 61, (2, 19))
    y = torch.randint(0, 61, (2, 19))
    twin = copy.deepcopy(model)
    _, loss = torch.compile(model, backend="aot_eager", fullgraph=True)(x, y)
    loss.backward()
    _, want = twin(x, y)
    want.backward()
    torch.testing.assert_close(loss, want)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
