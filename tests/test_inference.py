"""The inference engine (mqa_lm.inference) on CPU: greedy tokens equal the growing-cache path, the
engine's logits equal full forwards of the generated text, left-padded batches equal their rows run
alone, device sampling follows the same distribution as sample_next_token, and bad input fails early.
The Triton decode kernel and the engine on it run under the interpreter in a subprocess."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run_interpreted

from mqa_lm import MQAConfig, MQATransformer
from mqa_lm.inference import InferenceEngine, cache_length, sample_with_uniform
from mqa_lm.inference.generate import generate, generate_with_growing_cache
from mqa_lm.kernels.triton_backend import triton_importable

POS_EMBS = ["learned", "rope", "alibi", "none"]


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def tiny_model(dtype=torch.float32, seed=0, **overrides) -> MQATransformer:
    # init_std well above GPT-2's so attention (and so the cache and positions) drives the logits.
    values = dict(
        vocab_size=64, max_seq_len=48, n_layers=2, d_model=32, heads=4, kv_heads=2, attn_impl="torch", init_std=0.3
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = MQATransformer(MQAConfig(**values)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(batch, seq, vocab=64, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_greedy_tokens_equal_the_growing_cache_path(pos_emb, kv_heads):
    model = tiny_model(pos_emb=pos_emb, kv_heads=kv_heads)
    idx = tokens(2, 5)
    want = generate_with_growing_cache(model, idx, 30, temperature=0.0)
    engine = InferenceEngine(model, batch_size=2, max_len=40)
    assert engine.attention == "sdpa" and not engine.cuda_graph
    got = engine.generate(idx, 30, temperature=0.0, chunk=7)
    assert torch.equal(got, want)
    # MQATransformer.generate dispatches to an engine for this call.
    assert torch.equal(generate(model, idx, 30, temperature=0.0), want)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pos_emb="rope", qk_ln=True, clip_qkv=0.8, norm_type="rmsnorm", mlp_type="swiglu", bias=False),
        dict(pos_emb="alibi", heads=8, kv_heads=2, softmax_scale=0.3, tie_embeddings=False),
    ],
    ids=["rope_qkln_clip_swiglu", "alibi_h8_scale_untied"],
)
def test_engine_logits_equal_full_forwards_of_the_generated_text(overrides):
    # Every step's logits against a cache-free forward of the final sequence (fp64: exact up to
    # rounding), so the cache writes, positions and masks are checked at every position.
    model = tiny_model(torch.float64, **overrides)
    idx = tokens(3, 6)
    engine = InferenceEngine(model, batch_size=3, max_len=32, keep_logits=True)
    out = engine.generate(idx, 20, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(out[:, :-1])
    got = engine.step_logits[:20].transpose(0, 1)
    torch.testing.assert_close(got, full[:, 5:].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_left_padded_batch_equals_rows_run_alone(pos_emb):
    model = tiny_model(torch.float64, pos_emb=pos_emb, kv_heads=1)
    lengths = [3, 9, 6]
    width = max(lengths)
    # The padding holds arbitrary token ids: only the mask may keep them out.
    idx = tokens(3, width, seed=2)
    mask = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]
    engine = InferenceEngine(model, batch_size=3, max_len=48, keep_logits=True)
    batched = engine.generate(idx, 16, prompt_mask=mask, temperature=0.0)[:, width:]
    batched_logits = engine.step_logits[:16].clone()
    for row, n in enumerate(lengths):
        prompt = idx[row : row + 1, width - n :]
        alone = InferenceEngine(model, batch_size=1, max_len=48, keep_logits=True)
        single = alone.generate(prompt, 16, temperature=0.0)[:, n:]
        assert torch.equal(batched[row], single[0]), f"row {row}"
        torch.testing.assert_close(batched_logits[:, row], alone.step_logits[:16, 0], rtol=1e-6, atol=1e-6)
        # And the unpadded row through the growing-cache path.
        assert torch.equal(single, generate_with_growing_cache(model, prompt, 16, temperature=0.0)[:, n:])


def test_eos_and_chunks_match_the_growing_cache_path():
    model = tiny_model(torch.float64)
    idx = tokens(2, 4)
    free = generate_with_growing_cache(model, idx, 20, temperature=0.0)[:, 4:]
    eos = int(free[0, 3])
    want = generate_with_growing_cache(model, idx, 20, temperature=0.0, eos_token_id=eos)
    engine = InferenceEngine(model, batch_size=2, max_len=32)
    for chunk in (1, 3, 32):
        assert torch.equal(engine.generate(idx, 20, temperature=0.0, eos_token_id=eos, chunk=chunk), want)
    streamed = list(engine.stream(idx, 20, temperature=0.0, chunk=6))
    assert [p.shape[1] for p in streamed] == [6, 6, 6, 2]
    assert torch.equal(torch.cat(streamed, dim=1), free)


def test_sampling_is_reproducible_and_follows_the_generator():
    model = tiny_model()
    idx = tokens(2, 3)
    engine = InferenceEngine(model, batch_size=2, max_len=32)
    run = lambda seed: engine.generate(
        idx,
        12,
        temperature=0.9,
        top_k=10,
        top_p=0.9,  # noqa: E731
        generator=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def _filtered_probs64(logits, temperature, top_k, top_p):
    """The distribution sample_next_token draws from, in float64, by sorting."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if (top_k is not None and rank >= top_k) or (top_p is not None and mass >= top_p):
            break
        keep[i] = True
        mass += probs[i].item()
    kept = probs * keep
    return kept / kept.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.6), (1.0, 4, 0.8)]
)
def test_device_sampling_matches_the_filtered_distribution(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(1, 7) * 1.5
    n = 40000
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(1))
    picks = sample_with_uniform(logits.expand(n, 7), uniform, temperature, top_k, top_p)
    freq = torch.bincount(picks, minlength=7).double() / n
    want = _filtered_probs64(logits[0], temperature, top_k, top_p)
    assert torch.equal(freq > 0, want > 0)  # exactly the allowed tokens are ever drawn
    # Binomial standard error at n = 40000 is <= 0.0025; 5 sigma.
    assert (freq - want).abs().max() < 0.0125


def test_greedy_and_degenerate_sampling():
    logits = torch.randn(5, 11)
    u = torch.rand(5)
    assert torch.equal(sample_with_uniform(logits, u, 0.0), logits.argmax(-1))
    assert torch.equal(sample_with_uniform(logits, u, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_with_uniform(logits, u, 0.7, top_p=1e-6), logits.argmax(-1))
    # u = 0 and u just below 1 pick the first and the last token with probability.
    probs_edge = sample_with_uniform(logits, torch.tensor([0.0, 1 - 1e-7, 0.0, 1 - 1e-7, 0.5]), 1.0, top_k=3)
    top3 = logits.topk(3).indices
    assert torch.equal(probs_edge[:4], torch.stack([top3[0, 0], top3[1, 2], top3[2, 0], top3[3, 2]]))


def test_bad_input_raises_one_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"max_len must be in \[1, max_seq_len=48\], got 49"):
        InferenceEngine(model, batch_size=1, max_len=49)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        InferenceEngine(model, batch_size=1, attention="flash")
    with pytest.raises(ValueError, match="attention='triton' needs"):
        InferenceEngine(model, batch_size=1, attention="triton")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        InferenceEngine(model, batch_size=1, cuda_graph=True)
    engine = InferenceEngine(model, batch_size=2, max_len=16)
    idx = tokens(2, 4)
    with pytest.raises(ValueError, match="built for batch_size=2, got a batch of 3"):
        engine.generate(tokens(3, 4), 2)
    with pytest.raises(ValueError, match="needs a cache of 19, this engine has max_len=16"):
        engine.generate(idx, 16)
    right_padded = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with pytest.raises(ValueError, match="left padding"):
        engine.generate(idx, 2, prompt_mask=right_padded)
    with pytest.raises(ValueError, match=r"prompt_mask must be bool \[batch=2, seq=4\]"):
        engine.generate(idx, 2, prompt_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        engine.generate(idx, 2, top_p=1.5)


def test_generate_falls_back_where_the_engine_does_not_apply(monkeypatch):
    model = tiny_model(torch.float64, max_seq_len=12)
    idx = tokens(2, 5)
    # 5 + 20 tokens slide past max_seq_len=12: the growing-cache path's cropping semantics.
    assert torch.equal(
        generate(model, idx, 20, temperature=0.0), generate_with_growing_cache(model, idx, 20, temperature=0.0)
    )
    monkeypatch.setenv("MQA_LM_GENERATE_ENGINE", "0")
    assert torch.equal(
        generate(model, idx, 6, temperature=0.0), generate_with_growing_cache(model, idx, 6, temperature=0.0)
    )


def test_cache_length_buckets():
    assert cache_length(1, 1024) == 64
    assert cache_length(64, 1024) == 64
    assert cache_length(65, 1024) == 128
    assert cache_length(543, 1024) == 1024
    assert cache_length(900, 1000) == 1000


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
def test_decode_kernel_and_engine_under_interpreter():
    result = run_interpreted("tests/triton_decode_cases.py")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def test_rotary_refactor_keeps_forward():
    from mqa_lm.nn.positions import RotaryEmbedding

    rotary = RotaryEmbedding(8, 100.0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    got = rotary(x, offset=4)
    pos = torch.arange(4, 9, dtype=torch.float64)
    inv = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = torch.outer(pos, inv)
    x1, x2 = x[..., :4], x[..., 4:]
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)
    torch.testing.assert_close(got, want)
    assert math.isclose(float(got.norm()), float(x.norm()), rel_tol=1e-9)


def test_compiled_step_equals_eager():
    # aot_eager traces the step with Dynamo and AOTAutograd (mutated state, sampling) without a
    # C++ toolchain; inductor runs in tests/test_decode_gpu.py.
    from torch._dynamo.utils import counters

    counters.clear()
    model = tiny_model(pos_emb="alibi", kv_heads=1)
    idx = tokens(2, 5)
    eager = InferenceEngine(model, batch_size=2, max_len=40)
    compiled = InferenceEngine(model, batch_size=2, max_len=40, compile="aot_eager")
    for kwargs in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.8)):
        want = eager.generate(idx, 25, generator=torch.Generator().manual_seed(0), **kwargs)
        got = compiled.generate(idx, 25, generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] >= 2  # one graph per sampling setting, no fallback


def test_generate_under_and_outside_inference_mode():
    # An engine whose buffers were made under inference_mode must not be reused outside it.
    model = tiny_model()
    idx = tokens(1, 4)
    with torch.inference_mode():
        inside = generate(model, idx, 8, temperature=0.0)
    outside = generate(model, idx, 8, temperature=0.0)
    assert torch.equal(inside, outside)
