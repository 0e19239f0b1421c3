"""Generation (mqa_lm.inference) on CPU, against loops over the model's cache-free forward: greedy tokens
in context, nanoGPT's crop and the sliding re-prefill past the context, left-padded batches equal their
rows alone, every step's logits equal a full forward, one sampler whose i-th token uses the i-th
uniform whatever the prompt length, and bad input fails early. The Triton decode kernel and the engine
on it run under the interpreter in a subprocess."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import interpreter_unusable, run_interpreted

from mqa_lm import MQAConfig, MQATransformer, generate
from mqa_lm.inference import InferenceEngine, cache_length, sample_with_uniform
from mqa_lm.inference.config import GenerationConfig
from mqa_lm.kernels.triton_backend import triton_importable
from mqa_lm.nn.cache import DynamicKVCache

POS_EMBS = ["learned", "rope", "alibi", "none"]


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def tiny_model(dtype=torch.float64, seed=0, **overrides) -> MQATransformer:
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


@torch.no_grad()
def naive(model, idx, n, rule="crop", eos=None):
    """Greedy decoding by full forwards of a window, no cache. ``crop``: nanoGPT's, the last
    ``max_seq_len`` tokens. ``slide``: the window starts where the last re-prefill started; when it
    would exceed ``max_seq_len`` it restarts at the last ``max_seq_len // 2`` tokens."""
    limit = model.config.max_seq_len
    start = max(0, idx.shape[1] - limit)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool)
    for _ in range(n):
        if rule == "crop":
            start = max(0, idx.shape[1] - limit)
        elif idx.shape[1] - start > limit:
            start = idx.shape[1] - limit // 2
        logits, _ = model(idx[:, start:])
        token = logits[:, -1].argmax(-1)
        if eos is not None:
            token = torch.where(finished, eos, token)
            finished |= token == eos
        idx = torch.cat([idx, token[:, None]], dim=1)
    return idx


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_greedy_tokens_equal_full_forwards_in_context(pos_emb, kv_heads):
    model = tiny_model(pos_emb=pos_emb, kv_heads=kv_heads)
    idx = tokens(2, 5)
    want = naive(model, idx, 30)
    engine = InferenceEngine(model, batch_size=2, max_len=40)
    assert engine.attention == "sdpa" and not engine.cuda_graph
    assert torch.equal(engine.generate(idx, GenerationConfig(30, temperature=0.0), chunk=7), want)
    assert torch.equal(generate(model, idx, 30, temperature=0.0), want)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("rule", ["crop", "slide"])
def test_past_the_context_each_rule_equals_its_naive_loop(pos_emb, rule):
    # 3x max_seq_len new tokens: the cache fills, then crop recomputes the last window per token and
    # slide re-prefills the last half window; both stay batched.
    model = tiny_model(pos_emb=pos_emb, max_seq_len=16)
    idx = tokens(2, 5)
    want = naive(model, idx, 48, rule)
    assert torch.equal(generate(model, idx, 48, temperature=0.0, context_overflow=rule), want)
    engine = InferenceEngine(model, batch_size=2)
    for chunk in (1, 5, 64):
        assert torch.equal(
            engine.generate(idx, GenerationConfig(48, temperature=0.0, context_overflow=rule), chunk=chunk), want
        )
    # A prompt longer than the context: crop reads its last max_seq_len tokens, as nanoGPT does.
    long_prompt = tokens(2, 23, seed=3)
    assert torch.equal(
        generate(model, long_prompt, 10, temperature=0.0, context_overflow=rule), naive(model, long_prompt, 10, rule)
    )


def test_context_overflow_error_refuses_before_any_work():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match=r"needs a window of 20, past this engine's max_len=16 .*'slide' or 'crop'"):
        generate(model, tokens(1, 5), 16, temperature=0.0, context_overflow="error")
    assert generate(model, tokens(1, 5), 12, temperature=0.0, context_overflow="error").shape == (1, 17)
    with pytest.raises(ValueError, match=r"context_overflow must be one of slide, crop, error, got 'wrap'"):
        generate(model, tokens(1, 5), 2, context_overflow="wrap")


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
    model = tiny_model(**overrides)
    idx = tokens(3, 6)
    engine = InferenceEngine(model, batch_size=3, max_len=32, keep_logits=True)
    out = engine.generate(
        idx, GenerationConfig(20, temperature=1.0, top_k=20), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        full, _ = model(out[:, :-1])
    torch.testing.assert_close(engine.step_logits.transpose(0, 1), full[:, 5:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("rule", ["slide", "crop"])
def test_left_padded_batch_equals_rows_run_alone(pos_emb, rule):
    # 30 new tokens with max_seq_len 24: every row passes the context while batched with the others.
    model = tiny_model(pos_emb=pos_emb, kv_heads=1, max_seq_len=24)
    lengths = [3, 9, 6]
    width = max(lengths)
    # The padding holds arbitrary token ids: only the mask may keep them out.
    idx = tokens(3, width, seed=2)
    mask = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]
    engine = InferenceEngine(model, batch_size=3, keep_logits=True)
    batched = engine.generate(idx, GenerationConfig(30, temperature=0.0, context_overflow=rule), prompt_mask=mask)[
        :, width:
    ]
    batched_logits = engine.step_logits.clone()
    # crop computes each row's own last window, so rows equal themselves alone throughout; slide
    # re-prefills the batch's last half window when the batch's cache is full (after 24 - 9 + 1
    # tokens), which for a padded row comes earlier than alone: equal up to there.
    same = 30 if rule == "crop" else 24 - width + 1
    for row, n in enumerate(lengths):
        prompt = idx[row : row + 1, width - n :]
        alone = InferenceEngine(model, batch_size=1, keep_logits=True)
        single = alone.generate(prompt, GenerationConfig(30, temperature=0.0, context_overflow=rule))[:, n:]
        assert torch.equal(batched[row, :same], single[0, :same]), f"row {row}"
        torch.testing.assert_close(batched_logits[:same, row], alone.step_logits[:same, 0], rtol=1e-9, atol=1e-9)
    # The longest row has no padding: its every window is the naive rule's.
    assert torch.equal(batched[1:2], naive(model, idx[1:2], 30, rule)[:, width:])


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_an_unpadded_prefill_without_a_key_mask_equals_the_masked_one(pos_emb):
    """Without padding the prefill attends with no key mask (SDPA's causal path); in float64 it
    gives the masked prefill's logits and leaves the same cache and key mask for the decode steps."""
    model = tiny_model(pos_emb=pos_emb)
    idx = tokens(3, 11)
    mask = torch.ones_like(idx, dtype=torch.bool)
    runs = []
    for padded in (True, False):
        engine = InferenceEngine(model, batch_size=3, max_len=32)
        first = engine._prefill(idx, mask, padded=padded)
        assert engine.cache.prefill_masked is padded
        runs.append((first, [layer.kv.clone() for layer in engine.cache.layers], engine.cache.key_mask.clone()))
    (first_a, kv_a, keys_a), (first_b, kv_b, keys_b) = runs
    torch.testing.assert_close(first_b, first_a, rtol=1e-12, atol=1e-12)
    for a, b in zip(kv_a, kv_b):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert torch.equal(keys_a, keys_b)


def test_eos_and_chunks_match_the_naive_loop():
    model = tiny_model()
    idx = tokens(2, 4)
    free = naive(model, idx, 20)[:, 4:]
    eos = int(free[0, 3])
    want = naive(model, idx, 20, eos=eos)
    want = want[:, : 4 + int((want[:, 4:] == eos).int().argmax(dim=1).max()) + 1]
    engine = InferenceEngine(model, batch_size=2, max_len=32)
    for chunk in (1, 3, 32):
        assert torch.equal(
            engine.generate(idx, GenerationConfig(20, temperature=0.0), eos_token_id=eos, chunk=chunk), want
        )
    streamed = list(engine.stream(idx, GenerationConfig(20, temperature=0.0), chunk=6))
    assert [p.shape[1] for p in streamed] == [1, 6, 6, 6, 1]  # the prefill's token comes alone, first
    assert torch.equal(torch.cat(streamed, dim=1), free)


@pytest.mark.parametrize("prompt_len,new", [(4, 12), (30, 40)], ids=["in_context", "past_context"])
def test_one_sampler_token_i_uses_uniform_i(prompt_len, new):
    # Every new token is sample_with_uniform(its logits, the i-th uniform drawn from the generator),
    # whatever the prompt length and whether the window slid: the same seed, the same draws.
    model = tiny_model(max_seq_len=32)
    idx = tokens(2, prompt_len)
    engine = InferenceEngine(model, batch_size=2, keep_logits=True)
    settings = dict(temperature=0.9, top_k=10, top_p=0.9)
    out = engine.generate(idx, GenerationConfig(new, **settings), generator=torch.Generator().manual_seed(5), chunk=5)
    uniforms = torch.rand(new, 2, generator=torch.Generator().manual_seed(5))
    logits = engine.step_logits
    picked = torch.stack([sample_with_uniform(logits[i], uniforms[i], **settings) for i in range(new)], dim=1)
    assert torch.equal(out[:, prompt_len:], picked)
    again = engine.generate(
        idx, GenerationConfig(new, **settings), generator=torch.Generator().manual_seed(5), chunk=64
    )
    assert torch.equal(again, out)
    other = engine.generate(idx, GenerationConfig(new, **settings), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other, out)


def _filtered_probs64(logits, temperature, top_k, top_p):
    """The distribution top-k / top-p sampling draws from, in float64, by sorting."""
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
    with pytest.raises(
        ValueError, match=r"max_len must be an integer in \[1, 48\], got 49; the model has positions for max_seq_len=48"
    ):
        InferenceEngine(model, batch_size=1, max_len=49)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        InferenceEngine(model, batch_size=1, attention="flash")
    with pytest.raises(ValueError, match="decode_attention='triton' needs"):
        InferenceEngine(model, batch_size=1, attention="triton")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        InferenceEngine(model, batch_size=1, cuda_graph=True)
    engine = InferenceEngine(model, batch_size=2, max_len=16)
    idx = tokens(2, 4)
    with pytest.raises(ValueError, match="built for batch_size=2, got a batch of 3"):
        engine.generate(tokens(3, 4), GenerationConfig(2))
    right_padded = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with pytest.raises(ValueError, match="left padding"):
        engine.generate(idx, GenerationConfig(2), prompt_mask=right_padded)
    with pytest.raises(ValueError, match=r"prompt_mask must be bool \[batch=2, seq=4\]"):
        engine.generate(idx, GenerationConfig(2), prompt_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        engine.generate(idx, GenerationConfig(2, top_p=1.5))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        generate(model, idx, -1)
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate(model, tokens(1, 0), 2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        generate(model, torch.tensor([[3, 64]]), 2)


def test_static_cache_takes_a_prefill_then_one_token_per_call():
    model = tiny_model(pos_emb="rope")
    cache = model.static_cache(1, 16)
    idx = tokens(1, 6)
    cache.reset(None, 4)
    logits, _ = model(idx[:, :4], cache=cache, logits_to_keep=1)
    for t in (4, 5):  # one token at a time: its position is its slot
        step, _ = model(idx[:, t : t + 1], cache=cache)
        logits = torch.cat([logits, step], dim=1)
    full, _ = model(idx)
    torch.testing.assert_close(logits, full[:, 3:], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="only as a prefill into an empty cache; call reset"):
        model(idx[:, :2], cache=cache)
    with pytest.raises(
        ValueError,
        match=r"max_len must be an integer in \[1, 48\], got \d+; the model has positions for max_seq_len=48",
    ):
        model.static_cache(1, 64)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_dynamic_cache_chunks_equal_one_forward(pos_emb):
    model = tiny_model(pos_emb=pos_emb)
    idx = tokens(2, 12)
    cache = DynamicKVCache()
    pieces = [model(idx[:, s : s + n], cache=cache)[0] for s, n in ((0, 5), (5, 1), (6, 4), (10, 2))]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx)[0], rtol=1e-9, atol=1e-9)


def test_cache_length_buckets():
    assert cache_length(1, 1024) == 64
    assert cache_length(64, 1024) == 64
    assert cache_length(65, 1024) == 128
    assert cache_length(543, 1024) == 1024
    assert cache_length(900, 1000) == 1000


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.skipif(interpreter_unusable() is not None, reason=str(interpreter_unusable()))
def test_decode_kernel_and_engine_under_interpreter():
    result = run_interpreted("tests/triton_decode_cases.py")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
def test_the_split_plan_fills_whole_waves_of_programs():
    """The decode kernel's keys per split on a 132-SM card (H100, H200): about two programs per SM,
    never a few programs spilling into a wave of their own when a balanced count is at hand."""
    from mqa_lm.kernels.triton.decode import MAX_SPLITS, MIN_SPLIT, balanced_split

    sms = 132
    # Batch 32, 32k keys: 8 splits of 4096 (256 programs), not 9 of 3712 (288: 24 SMs run a third).
    assert balanced_split(32768, 32, sms) == 4096
    # 192 rows (batch 16 x 12 K/V heads): 2 splits (384 programs, 3 per SM), not 1 (192: 2 on 60 SMs).
    assert balanced_split(8192, 192, sms) == 4096
    for rows in range(1, 400):
        for max_len in (512, 2048, 8192, 32768):
            size = balanced_split(max_len, rows, sms)
            n_splits = math.ceil(max_len / size)
            assert size % MIN_SPLIT == 0 and 1 <= n_splits <= MAX_SPLITS
            # Against every split count: the busiest SM reads at most ~1.5x the keys of the best plan's.
            busiest = math.ceil(rows * n_splits / sms) * size
            best = min(
                math.ceil(rows * math.ceil(max_len / s) / sms) * s
                for s in (math.ceil(max_len / n / MIN_SPLIT) * MIN_SPLIT for n in range(1, MAX_SPLITS + 1))
            )
            assert busiest <= 1.5 * best, (rows, max_len, size, busiest, best)


def test_rotary_at_positions_equals_the_rotation_of_those_positions():
    from mqa_lm.nn.positions import RotaryEmbedding

    rotary = RotaryEmbedding(8, 100.0, max_positions=32)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    got = rotary(x, offset=4)
    pos = torch.arange(4, 9, dtype=torch.float64)
    inv = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = torch.outer(pos, inv)
    x1, x2 = x[..., :4], x[..., 4:]
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)
    torch.testing.assert_close(got, want)
    assert math.isclose(float(got.norm()), float(x.norm()), rel_tol=1e-9)
    # Per-row positions: row 0 at 4..8, row 1 at 0..4.
    positions = torch.stack([torch.arange(4, 9), torch.arange(0, 5)])
    at = rotary.at(x, positions)
    torch.testing.assert_close(at[0], want[0])
    torch.testing.assert_close(at[1], rotary(x[1:], offset=0)[0])


def test_compiled_step_equals_eager():
    # aot_eager traces the step with Dynamo and AOTAutograd (the model's forward over the cache,
    # mutated state, sampling) without a C++ toolchain; inductor runs in tests/test_decode_gpu.py.
    from torch._dynamo.utils import counters

    counters.clear()
    model = tiny_model(torch.float32, pos_emb="alibi", kv_heads=1)
    idx = tokens(2, 5)
    eager = InferenceEngine(model, batch_size=2, max_len=40)
    compiled = InferenceEngine(model, batch_size=2, max_len=40, compile="aot_eager")
    # The first token is the prefill's: it comes before any compilation (the step is wrapped lazily).
    stream = compiled.stream(idx, GenerationConfig(3, temperature=0.0), chunk=2)
    next(stream)
    assert counters["stats"]["unique_graphs"] == 0
    list(stream)
    assert counters["stats"]["unique_graphs"] == 1
    for kwargs in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.8)):
        want = eager.generate(idx, GenerationConfig(25, **kwargs), generator=torch.Generator().manual_seed(0))
        got = compiled.generate(idx, GenerationConfig(25, **kwargs), generator=torch.Generator().manual_seed(0))
        assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 2  # one graph per sampling setting: no fallback, no recompile


def test_generate_under_and_outside_inference_mode_and_keeps_training_mode():
    # An engine whose buffers were made under inference_mode must not be reused outside it.
    model = tiny_model(attn_pdrop=0.5, resid_pdrop=0.5).train()
    idx = tokens(1, 4)
    with torch.inference_mode():
        inside = generate(model, idx, 8, temperature=0.0)
    outside = generate(model, idx, 8, temperature=0.0)
    assert torch.equal(inside, outside)
    assert model.training  # generate ran it in eval mode (no dropout) and gave it back as it was
    assert torch.equal(outside, naive(model.eval(), idx, 8))
