"""MQATransformer: fp64 parity with a model assembled from the reference pieces, incremental decoding,
loss, tying, init, accounting, generation and config validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import attention_weights
from mqa_reference import press_alibi_slopes, ref_alibi, ref_attention, ref_model_logits, ref_norm, ref_qkv

from mqa_lm import MQAConfig, MQATransformer
from mqa_lm.inference import generate
from mqa_lm.nn.cache import DynamicKVCache

POS_EMBS = ["learned", "rope", "alibi", "none"]


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def tiny_config(**overrides) -> MQAConfig:
    # init_std well above GPT-2's 0.02 so attention, not just the current token's embedding, drives
    # the logits: a cache or position bug then moves them visibly and flips greedy tokens.
    values = dict(
        vocab_size=64, max_seq_len=16, n_layers=2, d_model=32, heads=4, kv_heads=2, attn_impl="torch", init_std=0.2
    )
    values.update(overrides)
    return MQAConfig(**values)


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> MQATransformer:
    """An eval-mode model whose zero-initialised biases and unit norm gains are perturbed, so the
    reference comparison exercises them."""
    torch.manual_seed(seed)
    model = MQATransformer(tiny_config(**overrides)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(batch: int, seq: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- forward parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(mlp_type="swiglu", norm_type="rmsnorm", kv_heads=1, bias=False),
        dict(tie_embeddings=False, qk_ln=True, norm_type="layernorm", clip_qkv=0.5, kv_heads=4, mlp_hidden=48),
        dict(heads=8, kv_heads=2, softmax_scale=0.3, norm_type="low_precision_rmsnorm", rope_theta=50.0),
    ],
    ids=["gelu_lpln_gqa", "swiglu_rms_mqa_nobias", "untied_qkln_clip_mha", "h8_scale_lprms"],
)
def test_model_matches_fp64_reference(pos_emb, variant):
    model = tiny_model(torch.float64, pos_emb=pos_emb, **variant)
    idx = tokens(2, 11)
    logits, _ = model(idx)
    assert logits.shape == (2, 11, 64) and logits.dtype == torch.float64
    torch.testing.assert_close(logits, ref_model_logits(model, idx), rtol=1e-9, atol=1e-10)


def test_alibi_logits_do_not_depend_on_max_seq_len():
    # The bias for the newest key must be ~0 whatever max_seq_len is: a bias offset by
    # slope * max_seq_len costs fp32 (and far more bf16) precision in every score.
    idx = tokens(2, 10)
    short = tiny_model(pos_emb="alibi", max_seq_len=16, kv_heads=1, init_std=0.5)
    long = tiny_model(pos_emb="alibi", max_seq_len=8192, kv_heads=1, init_std=0.5)
    assert torch.equal(short.wte.weight, long.wte.weight)
    want = ref_model_logits(long, idx)
    assert (long(idx)[0].double() - want).abs().max() <= 2e-5 * want.abs().max()
    torch.testing.assert_close(long(idx)[0], short(idx)[0], rtol=0, atol=0)


def test_alibi_bias_stays_fp32_when_the_model_is_cast():
    model = tiny_model(pos_emb="alibi", heads=8, kv_heads=2, max_seq_len=1024).to(torch.bfloat16)
    bias = model.alibi_bias(torch.device("cpu"))
    slopes = torch.tensor(press_alibi_slopes(8), dtype=torch.float64)
    want = -slopes[:, None] * torch.arange(1023, -1, -1, dtype=torch.float64)[None, :]
    assert bias.dtype == torch.float32 and bias.shape == (1, 8, 1, 1024)
    torch.testing.assert_close(bias[0, :, 0].double(), want, rtol=1e-7, atol=0)
    assert tiny_model(pos_emb="rope").alibi_bias(torch.device("cpu")) is None


def test_attention_weights_match_reference():
    model = tiny_model(torch.float64, pos_emb="alibi")
    idx = tokens(2, 9)
    weights = attention_weights(model, idx)
    assert len(weights) == 2 and weights[0].shape == (2, 4, 9, 9)
    x = ref_norm(model.blocks[0].norm_1, model.wte.weight.double()[idx])
    q, k, v = ref_qkv(model.blocks[0].attn, x)
    _, probs = ref_attention(q, k, v, scale=1 / math.sqrt(8), causal=True, bias=ref_alibi(4, 9))
    torch.testing.assert_close(weights[0], probs, rtol=1e-9, atol=1e-10)


# ---- incremental decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 14, [6, 1, 4, 3]], ids=["tokens", "chunks"])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_model_incremental_decoding_equals_full_forward(pos_emb, chunks):
    model = tiny_model(pos_emb=pos_emb, kv_heads=1)
    idx = tokens(3, 14)
    full, _ = model(idx)
    cache, start = DynamicKVCache(), 0
    for n in chunks:
        logits, _ = model(idx[:, start : start + n], cache=cache)
        assert (logits - full[:, start : start + n]).abs().max() <= 1e-5
        start += n
    assert len(cache.layers) == 2 and cache.layers[0][0].shape == (3, 1, 14, 8)


# ---- loss, tying, init, accounting ---------------------------------------------------------------


def test_loss_equals_independent_cross_entropy():
    model = tiny_model()
    idx, targets = tokens(3, 12), tokens(3, 12, seed=2)
    targets[0, :4] = -100
    targets[2, -1] = -100
    logits, loss = model(idx, targets)

    log_probs = logits.double().log_softmax(-1)
    keep = targets != -100
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want = -(picked * keep).sum() / keep.sum()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    assert model(idx)[1] is None


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_chunked_loss_equals_the_torch_loss_and_its_gradients(chunk_rows):
    idx, targets = tokens(3, 12), tokens(3, 12, seed=2)
    targets[0, :4] = -100
    plain = tiny_model(torch.float64)
    chunked = tiny_model(torch.float64, loss_impl="chunked")
    if chunk_rows is not None:
        chunked.loss_chunk_rows = lambda: chunk_rows  # several chunks, the last one short
    logits, _ = plain(idx)
    # The float64 reference (the torch path rounds its loss to fp32).
    want = F.cross_entropy(logits.view(-1, 64), targets.view(-1), ignore_index=-100)
    none, loss = chunked(idx, targets)
    assert none is None
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    want_grads = torch.autograd.grad(want, list(plain.parameters()))
    grads = torch.autograd.grad(loss, list(chunked.parameters()))
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked(idx)[0], logits, rtol=0, atol=0)  # no targets: the logits


def test_weights_are_tied_by_default_and_untied_on_request():
    tied = MQATransformer(tiny_config())
    assert tied.lm_head.weight is tied.wte.weight
    idx = tokens(2, 5)
    tied(idx, tokens(2, 5, seed=3))[1].backward()
    assert tied.wte.weight.grad is not None and tied.lm_head.weight.grad is tied.wte.weight.grad

    untied = MQATransformer(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_gpt2_init_statistics():
    n_layers, std = 4, 0.02
    model = MQATransformer(
        MQAConfig(
            vocab_size=2048,
            max_seq_len=256,
            n_layers=n_layers,
            d_model=256,
            heads=4,
            kv_heads=1,
            attn_impl="torch",
            init_std=std,
        )
    )
    residual_std = std / math.sqrt(2 * n_layers)
    for block in model.blocks:
        for w in (block.attn.out_proj.weight, block.mlp.down_proj.weight):
            assert abs(w.std().item() - residual_std) < 0.05 * residual_std
            assert abs(w.mean().item()) < 0.05 * residual_std
        for w in (block.attn.Wqkv.weight, block.mlp.up_proj.weight):
            assert abs(w.std().item() - std) < 0.05 * std
    for w in (model.wte.weight, model.wpe.weight):
        assert abs(w.std().item() - std) < 0.05 * std
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name


def _expected_params(c: MQAConfig) -> tuple[int, int]:
    """(total, non-embedding) parameter counts from the architecture, by hand."""
    d, hd = c.d_model, c.d_model // c.heads
    norm = 2 * d if "layernorm" in c.norm_type else d
    qkv_out = d + 2 * c.kv_heads * hd
    hidden = c.mlp_hidden or 4 * d
    up_out = 2 * hidden if c.mlp_type == "swiglu" else hidden
    per_layer = 2 * norm + d * qkv_out + qkv_out + d * d + d + d * up_out + up_out + hidden * d + d
    wte = c.vocab_size * d
    wpe = c.max_seq_len * d if c.pos_emb == "learned" else 0
    head = 0 if c.tie_embeddings else c.vocab_size * d
    total = wte + wpe + c.n_layers * per_layer + norm + head
    non_embedding = total - wpe - (0 if c.tie_embeddings else wte)
    return total, non_embedding


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_embeddings=False), dict(pos_emb="rope", mlp_type="swiglu", mlp_hidden=40, norm_type="rmsnorm")],
    ids=["tied_learned", "untied", "rope_swiglu"],
)
def test_num_params_and_flops_per_token(overrides):
    c = tiny_config(**overrides)
    model = MQATransformer(c)
    total, non_embedding = _expected_params(c)
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == non_embedding
    # PaLM appendix B: 6N + 12 * L * H * Q * T.
    attention_per_position = 12 * c.n_layers * c.heads * (c.d_model // c.heads)
    assert model.flops_per_token() == 6 * non_embedding + attention_per_position * c.max_seq_len
    assert model.flops_per_token(seq_len=5) == 6 * non_embedding + attention_per_position * 5


def test_embedding_and_residual_dropout_only_in_training():
    model = tiny_model(emb_pdrop=0.3, resid_pdrop=0.3)
    plain = tiny_model()  # same seed, no dropout
    idx = tokens(2, 8)
    model.train()
    a, b = model(idx)[0], model(idx)[0]
    assert (a - b).abs().max() > 1e-3
    model.eval()
    torch.testing.assert_close(model(idx)[0], plain(idx)[0])


# ---- generation ----------------------------------------------------------------------------------


def greedy_by_full_forwards(model: MQATransformer, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """nanoGPT's loop: re-run the whole (cropped) context every step, no cache."""
    for _ in range(steps):
        logits, _ = model(idx[:, -model.config.max_seq_len :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_greedy_generate_with_crop_equals_full_forwards_past_max_seq_len(pos_emb):
    # fp64 so that no near-tie between two logits can flip an argmax.
    model = tiny_model(torch.float64, pos_emb=pos_emb, max_seq_len=12, init_std=0.5)
    idx = tokens(2, 5)
    with torch.no_grad():
        want = greedy_by_full_forwards(model, idx, 20)
    got = generate(model, idx, max_new_tokens=20, temperature=0.0, context_overflow="crop")
    assert got.shape == (2, 25)
    assert torch.equal(got, want)


def test_prompt_longer_than_max_seq_len_is_cropped():
    model = tiny_model(torch.float64, max_seq_len=12, init_std=0.5)
    idx = tokens(2, 15)
    with torch.no_grad():
        want = greedy_by_full_forwards(model, idx, 4)
    assert torch.equal(generate(model, idx, 4, temperature=0.0, context_overflow="crop"), want)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = tiny_model(torch.float64)
    idx = tokens(3, 4)
    greedy = generate(model, idx, 10, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 10, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(generate(model, idx, 10, temperature=0.7, top_p=1e-6, generator=g), greedy)
    sampled = generate(model, idx, 10, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(sampled, greedy)  # plain sampling at high temperature is not greedy


def test_sampling_follows_the_generator():
    model = tiny_model()
    idx = tokens(2, 3)
    a = generate(model, idx, 8, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = generate(model, idx, 8, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_eos_stops_rows():
    model = tiny_model(torch.float64)
    idx = tokens(2, 4)
    free = generate(model, idx, 12, temperature=0.0)[:, 4:]
    eos = int(free[0, 2])

    got = generate(model, idx, 12, temperature=0.0, eos_token_id=eos)[:, 4:]
    firsts = []
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        first = int(hits[0]) if len(hits) else None
        firsts.append(first)
        expected = free[row].clone()
        if first is not None:
            expected[first:] = eos
        assert torch.equal(got[row], expected[: got.shape[1]])
    if all(f is not None for f in firsts):
        assert got.shape[1] == max(firsts) + 1  # stopped once every row was done
    else:
        assert got.shape[1] == 12

    single = generate(model, idx[:1], 12, temperature=0.0, eos_token_id=eos)
    assert single.shape[1] == 4 + firsts[0] + 1 and int(single[0, -1]) == eos


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
        (dict(max_new_tokens=2, temperature=-0.5), r"temperature must be >= 0 \(0 = greedy\), got -0.5"),
        (dict(max_new_tokens=2, top_k=0), r"top_k must be null or an integer >= 1, got 0; null keeps all tokens"),
        (dict(max_new_tokens=2, top_p=0.0), r"top_p must be in \(0, 1\].*got 0.0"),
        (dict(max_new_tokens=2, top_p=1.5), r"top_p must be in \(0, 1\].*got 1.5"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, pattern):
    model = tiny_model()
    with pytest.raises(ValueError, match=pattern):
        generate(model, tokens(1, 3), **kwargs)
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate(model, tokens(1, 0), 2)


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(vocab_size=0), ValueError, r"model.vocab_size must be an integer >= 1, got 0"),
        (dict(max_seq_len=-3), ValueError, r"model.max_seq_len must be an integer >= 1, got -3"),
        (dict(n_layers=2.5), ValueError, r"model.n_layers must be an integer >= 1, got 2.5"),
        (dict(d_model=30), ValueError, r"model.d_model=30 is not divisible by model.heads=4"),
        (dict(d_model=0), ValueError, r"model.d_model must be an integer >= 1, got 0"),
        (dict(heads=4, kv_heads=3), ValueError, r"model.heads=4 is not divisible by model.kv_heads=3"),
        (
            dict(attn_impl="fast"),
            ValueError,
            r"unknown model.attn_impl 'fast'; valid choices are: auto, flash, torch, triton",
        ),
        (
            dict(norm_type="bn"),
            ValueError,
            r"unknown model.norm_type 'bn'; valid choices are: layernorm, low_precision_layernorm, "
            r"low_precision_rmsnorm, rmsnorm",
        ),
        (dict(fc_type="x"), ValueError, r"unknown model.fc_type 'x'; valid choices are: te, torch"),
        (dict(clip_qkv=0.0), ValueError, r"model.clip_qkv must be > 0.*got 0.0"),
        (dict(attn_pdrop=1.0), ValueError, r"model.attn_pdrop must be in \[0, 1\), got 1.0"),
        (dict(resid_pdrop=-0.1), ValueError, r"model.resid_pdrop must be in \[0, 1\), got -0.1"),
        (dict(emb_pdrop=1.0), ValueError, r"model.emb_pdrop must be in \[0, 1\), got 1.0"),
        (
            dict(pos_emb="sinusoidal"),
            ValueError,
            r"unknown model.pos_emb 'sinusoidal'; valid choices are: learned, rope, alibi, none",
        ),
        (
            dict(pos_emb="rope", d_model=36, heads=4),
            ValueError,
            r"pos_emb='rope' needs an even head_dim, got d_model/heads = 9",
        ),
        (dict(rope_theta=0.0), ValueError, r"model.rope_theta must be > 0, got 0.0"),
        (dict(mlp_type="relu"), ValueError, r"unknown model.mlp_type 'relu'; valid choices are: gelu, swiglu"),
        (
            dict(mlp_hidden=0),
            ValueError,
            r"model.mlp_hidden must be null or an integer >= 1, got 0; null is the MLP type's default width",
        ),
        (dict(init_std=0.0), ValueError, r"model.init_std must be > 0, got 0.0"),
        (dict(verbose=5), ValueError, r"model.verbose must be 0, 1 or 2, got 5"),
        (dict(softmax_scale=-1.0), ValueError, r"model.softmax_scale must be > 0.*got -1.0"),
        (dict(d_model=30), ValueError, r"; pick model.heads that divides model.d_model$"),
        (dict(loss_impl="fused"), ValueError, r"unknown model.loss_impl 'fused'; valid choices are: torch, chunked"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        tiny_config(**overrides)


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys():
    c = tiny_config(pos_emb="rope", mlp_type="swiglu")
    assert MQAConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown model config keys \['n_head'\]"):
        MQAConfig.from_dict({**c.to_dict(), "n_head": 4})


def test_token_ids_outside_the_vocabulary_name_its_size():
    model = tiny_model()
    vocab = model.config.vocab_size
    bad = tokens(2, 3, vocab)
    bad[1, 2] = vocab
    message = (
        rf"token ids must be in \[0, {vocab}\) for this model \(model.vocab_size={vocab}\), got ids from \d+ to {vocab}"
    )
    with pytest.raises(ValueError, match=message):
        model(bad)
    with pytest.raises(ValueError, match=message):
        generate(model, bad, 2)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"got ids from -1 to"):
        model(bad)
    model(tokens(2, 3, vocab))  # the largest valid id range passes


def test_fp16_hidden_states_into_an_fp32_block_name_both_dtypes():
    model = tiny_model()  # low_precision_layernorm keeps the input's dtype: the attention sees fp16
    x = torch.randn(1, 3, model.config.d_model, dtype=torch.float16)
    with pytest.raises(
        TypeError, match=r"x has dtype torch.float16 but this MultiQueryAttention's weights are torch.float32"
    ):
        model.blocks[0](x)


def test_forward_rejects_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"idx must be integer token ids \[batch, seq\], got torch.float32 \[2, 3\]"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"targets shape \[2, 4\] must equal idx shape \[2, 3\]"):
        model(tokens(2, 3), tokens(2, 4))
    with pytest.raises(ValueError, match=r"sequence of 17 tokens.*exceeds max_seq_len=16"):
        model(tokens(1, 17))
    cache = DynamicKVCache()
    model(tokens(1, 10), cache=cache)
    with pytest.raises(ValueError, match=r"cached 10 \+ new 7.*max_seq_len=16"):
        model(tokens(1, 7), cache=cache)
    cache.layers = cache.layers[:1]
    with pytest.raises(ValueError, match=r"the cache has 1 layers, the model 2"):
        model(tokens(1, 2), cache=cache)
    with pytest.raises(ValueError, match=r"positions must have the shape of idx \[1, 3\], got \[1, 2\]"):
        model(tokens(1, 3), positions=torch.zeros(1, 2, dtype=torch.long))
