"""GPU parity for attn_impl 'torch' and 'flash' in bf16 on realistic shapes (skipped without CUDA).

Every check compares the bf16 block (or model) with the fp64 reference of mqa_reference.py computed
from the same bf16 weights and inputs, by norm-wise relative error (<= 1e-2 for outputs and
weights). 'flash' runs with whatever FlashAttention generation is installed (FA4 after
../shared/device/fa4.sh) and again with it hidden, which exercises PyTorch's SDPA flash fallback.
Set MQA_EXPECT_FLASH=fa4 (or fa2, sdpa-flash) to make the run fail if that generation is not the one
in use.

Run on the device: python -m pytest -q tests/test_gpu_core.py
"""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from mqa_reference import press_alibi_slopes, ref_block, ref_model_logits

import mqa_lm.kernels.flash as flash_module
from mqa_lm import MQAConfig, MQATransformer, MultiQueryAttention
from mqa_lm.nn.cache import DynamicKVCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
REL_TOL = 1e-2
# Backward adds two more bf16 roundings (dO and the recomputed probabilities) on top of forward's.
GRAD_REL_TOL = 2e-2
MODEL_REL_TOL = 2e-2
SHAPES = [(8, 1), (8, 2), (16, 4)]  # (heads, kv_heads) at dim 1024: head_dim 128, 128, 64
DIM, BATCH, SEQ = 1024, 2, 1024


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(params=["installed", "hidden"])
def flash_generation(request, monkeypatch):
    """'installed': the best FlashAttention present; 'hidden': FA2/FA4 hidden from the backend, so
    'flash' takes PyTorch's SDPA flash kernel. Tests of 'torch' skip the second, identical run."""
    callspec = getattr(request.node, "callspec", None)
    impl = callspec.params.get("impl", "flash") if callspec else "flash"
    if request.param == "hidden":
        if impl != "flash":
            pytest.skip("attn_impl='torch' does not depend on the FlashAttention generation")
        monkeypatch.setattr(flash_module, "fa4_func", lambda: None)
        monkeypatch.setattr(flash_module, "fa2_func", lambda: None)
    return flash_module.flash_generation()


def fallback_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "falls back" in str(w.message)]


def make_block(impl: str, heads: int, kv_heads: int, **kwargs) -> MultiQueryAttention:
    torch.manual_seed(0)
    block = MultiQueryAttention(dim=DIM, heads=heads, kv_heads=kv_heads, attn_impl=impl, device=DEV, **kwargs)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return block.to(torch.bfloat16).eval()


def inputs(seq: int = SEQ) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(BATCH, seq, DIM, device=DEV, dtype=torch.bfloat16)


def alibi(heads: int, length: int) -> torch.Tensor:
    slopes = torch.tensor(press_alibi_slopes(heads), device=DEV)
    return (slopes[:, None] * torch.arange(1 - length, 1.0, device=DEV)[None, :])[None, :, None, :]


def padding_mask(seq: int) -> torch.Tensor:
    mask = torch.ones(BATCH, seq, dtype=torch.bool, device=DEV)
    mask[1, : seq // 8] = False  # left padding
    return mask


def kernels_used(caplog) -> list[str]:
    """Kernel names from the block's verbose=2 log lines ("MultiQueryAttention: <name> kernel, ...")."""
    records = [r for r in caplog.records if r.name == "mqa_lm.attention"]
    return [r.getMessage().split(":")[1].split(" kernel")[0].strip() for r in records]


def test_expected_flash_generation_is_in_use():
    expected = os.environ.get("MQA_EXPECT_FLASH")
    if not expected:
        pytest.skip("set MQA_EXPECT_FLASH to fa4, fa2 or sdpa-flash to check which FlashAttention runs")
    assert flash_module.flash_generation() == expected


# ---- block parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", SHAPES)
def test_torch_block_bf16_parity(heads, kv_heads, causal):
    block = make_block("torch", heads, kv_heads)
    x = inputs()
    out, _, _ = block(x, causal=causal)
    assert rel_err(out, ref_block(block, x, causal=causal)[0]) <= REL_TOL


@pytest.mark.parametrize("heads, kv_heads", SHAPES)
def test_torch_block_bf16_parity_with_mask_bias_and_weights(heads, kv_heads):
    block = make_block("torch", heads, kv_heads, qk_ln=True, clip_qkv=4.0, softmax_scale=0.1)
    x, mask, bias = inputs(), padding_mask(SEQ), alibi(heads, SEQ + 64)
    for needs_weights in (False, True):
        out, weights, _ = block(x, mask=mask, bias=bias, needs_weights=needs_weights)
        ref_out, ref_probs, _ = ref_block(block, x, mask=mask, bias=bias, softmax_scale=0.1)
        assert rel_err(out, ref_out) <= REL_TOL
        if needs_weights:
            assert rel_err(weights, ref_probs) <= REL_TOL


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", SHAPES)
def test_flash_block_bf16_parity_runs_the_flash_kernel(flash_generation, heads, kv_heads, causal, caplog):
    block = make_block("flash", heads, kv_heads, verbose=2)
    x = inputs()
    with caplog.at_level(logging.INFO, logger="mqa_lm.attention"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _, _ = block(x, causal=causal)
    assert fallback_notes(caught) == [] and kernels_used(caplog) == ["flash"], flash_generation
    assert rel_err(out, ref_block(block, x, causal=causal)[0]) <= REL_TOL


@pytest.mark.parametrize(
    "what, reason",
    [("mask", "key padding mask"), ("bias", "arbitrary bias"), ("weights", "reference math path")],
)
def test_flash_fallbacks_are_exact_and_announced(flash_generation, what, reason, caplog):
    heads, kv_heads = 8, 1
    block = make_block("flash", heads, kv_heads, verbose=2)
    x = inputs()
    kwargs = dict(mask=padding_mask(SEQ)) if what == "mask" else dict(bias=alibi(heads, SEQ)) if what == "bias" else {}
    with caplog.at_level(logging.INFO, logger="mqa_lm.attention"), pytest.warns(UserWarning, match=reason):
        out, weights, _ = block(x, needs_weights=what == "weights", **kwargs)
    assert kernels_used(caplog) == ["reference" if what == "weights" else "torch"]
    ref_out, ref_probs, _ = ref_block(block, x, **kwargs)
    assert rel_err(out, ref_out) <= REL_TOL
    if what == "weights":
        assert rel_err(weights, ref_probs) <= REL_TOL


@pytest.mark.parametrize("impl", ["torch", "flash"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (16, 4)])
def test_chunked_prefill_and_decoding_bf16(flash_generation, impl, heads, kv_heads):
    block = make_block(impl, heads, kv_heads)
    x = inputs(SEQ)
    ref_out, _, _ = ref_block(block, x)
    cache, start = None, 0
    for n in [700, 1, 1, 64, 1, 200, 1, 56]:
        out, _, cache = block(x[:, start : start + n], past_key_value=cache)
        assert rel_err(out, ref_out[:, start : start + n]) <= REL_TOL, (start, n)
        start += n
    assert start == SEQ and cache[0].shape == (BATCH, kv_heads, SEQ, DIM // heads)


@pytest.mark.parametrize("impl", ["torch", "flash"])
def test_gradients_bf16(flash_generation, impl):
    block = make_block(impl, 8, 1)
    x = inputs().requires_grad_()
    g = torch.randn(BATCH, SEQ, DIM, device=DEV, dtype=torch.bfloat16)
    leaves = [x, block.Wqkv.weight, block.out_proj.weight]
    got = torch.autograd.grad((block(x)[0].float() * g).sum(), leaves)
    want = torch.autograd.grad((ref_block(block, x)[0] * g.double()).sum(), leaves)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= GRAD_REL_TOL


@pytest.mark.parametrize("impl", ["torch", "flash"])
def test_attention_dropout_on_gpu(flash_generation, impl):
    block = make_block(impl, 8, 1, attn_pdrop=0.3)
    plain = make_block(impl, 8, 1)
    x = inputs(256)
    block.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FA4 without FA2 has no dropout and falls back, by design
        a, b = block(x)[0], block(x)[0]
    assert rel_err(a, b) > 1e-2
    block.eval()
    assert torch.equal(block(x)[0], plain(x)[0])


# ---- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_emb", ["learned", "rope", "alibi", "none"])
@pytest.mark.parametrize("impl", ["torch", "flash"])
def test_model_bf16_parity_and_incremental_decoding(flash_generation, impl, pos_emb):
    config = MQAConfig(
        vocab_size=4096,
        max_seq_len=1024,
        n_layers=2,
        d_model=DIM,
        heads=8,
        kv_heads=1,
        attn_impl=impl,
        pos_emb=pos_emb,
        init_std=0.05,
    )
    torch.manual_seed(0)
    model = MQATransformer(config).to(DEV, torch.bfloat16).eval()
    idx = torch.randint(0, 4096, (2, 512), device=DEV, generator=torch.Generator(DEV).manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
        # A whole model stacks bf16 roundings (residual stream, norms, two layers, logits): ~1.0-1.3%
        # was measured for the 'torch' path in CPU bf16, so the model-level bound is 2e-2.
        assert rel_err(full, ref_model_logits(model, idx)) <= MODEL_REL_TOL
        cache, start = DynamicKVCache(), 0
        for n in [300, 1, 1, 100, 1, 109]:
            logits, _ = model(idx[:, start : start + n], cache=cache)
            # Same weights and dtype: incremental and full differ only by kernel rounding.
            assert rel_err(logits, full[:, start : start + n]) <= REL_TOL, (start, n)
            start += n
