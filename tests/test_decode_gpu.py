"""The decode kernel and the inference engine on a CUDA GPU in bf16 (skipped without CUDA).

Kernel outputs are poisoned with NaN first, so an element the kernel skips fails the test; the
engine's logits at every step are checked against full forwards of the text it generated, and the
CUDA-graph replay against the same step run eagerly.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from mqa_lm import MQAConfig, MQATransformer  # noqa: E402
from mqa_lm.inference import (
    InferenceEngine,  # noqa: E402
    generate,
)
from mqa_lm.inference.config import GenerationConfig  # noqa: E402

# batch, heads, kv_heads, max_len, head_dim, lengths ("full" or a list), extra
CASES = [
    (1, 12, 1, 32768, 64, "full", ""),
    (1, 12, 1, 32768, 64, [20001], "bias"),
    (4, 12, 1, 4096, 64, [4096, 1000, 1, 0], "mask"),
    (2, 32, 8, 2000, 128, [2000, 1333], "mask+bias"),
    (3, 16, 16, 1500, 64, [1500, 7, 900], ""),
    (2, 8, 1, 777, 256, "full", "bias"),
    (16, 12, 1, 8192, 64, "full", ""),
    (2, 64, 1, 3000, 96, [2999, 3000], "mask"),
    # One split: the split kernel writes the output itself (no combine launch).
    (1, 12, 1, 200, 64, "full", ""),
    (5, 12, 1, 256, 64, [256, 100, 1, 0, 37], "mask+bias"),
]


def reference64(q, k, v, *, scale, lengths=None, key_mask=None, bias=None):
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads, max_len = q.shape[1], k.shape[1], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    allowed = torch.ones(q.shape[0], max_len, dtype=torch.bool, device=q.device)
    if lengths is not None:
        allowed &= torch.arange(max_len, device=q.device)[None, :] < lengths[:, None]
    if key_mask is not None:
        allowed &= key_mask
    allowed = allowed[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    seen = allowed.any(-1, keepdim=True)
    return (torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen) @ v


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}kv{}L{}d{}{}".format(*c[:5], c[6]))
def test_decode_kernel_bf16_matches_float64(case):
    from mqa_lm.kernels.triton.decode import decode_attention

    batch, heads, kv_heads, max_len, head_dim, lengths, extra = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", generator=gen).bfloat16()
    k = torch.randn(batch, kv_heads, max_len, head_dim, device="cuda", generator=gen).bfloat16()
    v = torch.randn(batch, kv_heads, max_len, head_dim, device="cuda", generator=gen).bfloat16()
    kwargs = {}
    if lengths != "full":
        kwargs["lengths"] = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    if "mask" in extra:
        kwargs["key_mask"] = torch.rand(batch, max_len, device="cuda", generator=gen) > 0.2
    if "bias" in extra:
        slopes = torch.tensor([2.0 ** (-8 * (i + 1) / heads) for i in range(heads)], device="cuda")
        kwargs["bias"] = (slopes[:, None] * (torch.arange(max_len, device="cuda") - (max_len - 1.0))).view(
            1, heads, 1, max_len
        )
    out = torch.full_like(q, float("nan"))
    got = decode_attention(q, k, v, out=out, softmax_scale=head_dim**-0.5, **kwargs)
    assert torch.isfinite(got).all()
    want = reference64(q, k, v, scale=head_dim**-0.5, **kwargs)
    assert rel_err(got, want) < 1e-2
    if lengths != "full":
        empty = torch.tensor(lengths, device="cuda") == 0
        assert torch.equal(got[empty], torch.zeros_like(got[empty]))


def small_model(pos_emb="learned", kv_heads=1, dtype=torch.bfloat16, **overrides):
    torch.manual_seed(0)
    values = dict(
        vocab_size=1000,
        max_seq_len=256,
        n_layers=4,
        d_model=256,
        heads=8,
        kv_heads=kv_heads,
        attn_impl="torch",
        pos_emb=pos_emb,
        init_std=0.05,
    )
    config = MQAConfig(**{**values, **overrides})
    # Relative error bounds of 3e-2 on logits: bf16 rounds every op; a cache, mask or position bug
    # moves logits by O(1).
    return MQATransformer(config).cuda().to(dtype).eval()


def prompts(batch, width, lengths=None, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.randint(0, 1000, (batch, width), device="cuda", generator=gen)
    if lengths is None:
        return idx, None
    mask = torch.arange(width, device="cuda")[None, :] >= (width - torch.tensor(lengths, device="cuda"))[:, None]
    return idx, mask


@pytest.mark.parametrize("pos_emb", ["learned", "rope", "alibi", "none"])
@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_engine_bf16_logits_match_full_forwards(pos_emb, attention):
    model = small_model(pos_emb, kv_heads=2)
    idx, _ = prompts(3, 17)
    engine = InferenceEngine(model, batch_size=3, max_len=256, attention=attention, keep_logits=True)
    assert engine.cuda_graph
    out = engine.generate(
        idx, GenerationConfig(100, temperature=0.8, top_k=50), generator=torch.Generator(device="cuda").manual_seed(2)
    )
    with torch.no_grad():
        full, _ = model(out[:, :-1])
    got = engine.step_logits[:100].transpose(0, 1)
    assert rel_err(got, full[:, 16:].float()) < 3e-2


@pytest.mark.parametrize("attention", ["triton", "sdpa"])
@pytest.mark.parametrize(
    "sampling", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=40)]
)
def test_cuda_graph_replay_equals_eager(attention, sampling):
    model = small_model("rope", kv_heads=1)
    idx, mask = prompts(4, 12, lengths=[12, 5, 9, 1])
    runs = []
    for graph in (True, False):
        engine = InferenceEngine(model, batch_size=4, max_len=128, attention=attention, cuda_graph=graph)
        gen = torch.Generator(device="cuda").manual_seed(3)
        runs.append(engine.generate(idx, GenerationConfig(90, **sampling), prompt_mask=mask, generator=gen))
    assert torch.equal(runs[0], runs[1])


def test_graph_is_reused_across_calls_with_different_prompts():
    model = small_model("alibi", kv_heads=4)
    engine = InferenceEngine(model, batch_size=2, max_len=128)
    first = engine.generate(prompts(2, 30, seed=4)[0], GenerationConfig(50, temperature=0.0))
    idx, mask = prompts(2, 9, lengths=[9, 3], seed=5)
    second = engine.generate(idx, GenerationConfig(70, temperature=0.0), prompt_mask=mask)
    assert len(engine._graphs) == 1
    fresh = InferenceEngine(model, batch_size=2, max_len=128, cuda_graph=False)
    assert torch.equal(second, fresh.generate(idx, GenerationConfig(70, temperature=0.0), prompt_mask=mask))
    assert torch.equal(first, fresh.generate(prompts(2, 30, seed=4)[0], GenerationConfig(50, temperature=0.0)))


def test_left_padded_rows_equal_rows_alone_bf16():
    model = small_model("rope", kv_heads=1)
    lengths = [20, 4, 13]
    idx, mask = prompts(3, 20, lengths=lengths, seed=6)
    batched = InferenceEngine(model, batch_size=3, max_len=128, keep_logits=True)
    batched.generate(idx, GenerationConfig(40, temperature=0.0), prompt_mask=mask)
    for row, n in enumerate(lengths):
        alone = InferenceEngine(model, batch_size=1, max_len=128, keep_logits=True)
        alone.generate(idx[row : row + 1, 20 - n :], GenerationConfig(1, temperature=0.0))
        # The first token's logits (prefill) agree to bf16 accuracy whatever the padding.
        assert rel_err(batched.step_logits[0, row], alone.step_logits[0, 0]) < 3e-2


def test_generate_uses_the_engine_and_matches_eager_and_autocast_runs():
    model = small_model("learned", kv_heads=1)
    idx, _ = prompts(2, 8)
    got = generate(model, idx, 60, temperature=0.0)
    eager = InferenceEngine(model, batch_size=2, max_len=128, cuda_graph=False).generate(
        idx, GenerationConfig(60, temperature=0.0)
    )
    assert torch.equal(got, eager)
    # fp32 weights under bf16 autocast (how training samples): the engine runs eagerly in bf16.
    model32 = small_model("rope", kv_heads=2, dtype=torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        engine = InferenceEngine(model32, batch_size=2, max_len=128, keep_logits=True)
        assert not engine.cuda_graph and engine.dtype == torch.bfloat16
        out = engine.generate(idx, GenerationConfig(30, temperature=0.0))
        full, _ = model32(out[:, :-1])
    assert rel_err(engine.step_logits[:30].transpose(0, 1), full[:, 7:].float()) < 3e-2


@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_inductor_compiled_graph_step_matches_full_forwards(attention):
    # Inductor fuses the norms in fp32 where eager rounds them in bf16, so a greedy argmax may flip and
    # the texts part ways: each step's logits are checked against a full forward of its own text.
    model = small_model("rope", kv_heads=1)
    idx, mask = prompts(2, 10, lengths=[10, 6])
    engine = InferenceEngine(model, batch_size=2, max_len=128, keep_logits=True, compile=True, attention=attention)
    assert engine.cuda_graph
    out = engine.generate(idx, GenerationConfig(40, temperature=0.0), prompt_mask=mask)
    assert out.shape == (2, 50)
    for row, pad in enumerate((0, 4)):
        with torch.no_grad():
            full, _ = model(out[row : row + 1, pad:-1])
        assert rel_err(engine.step_logits[:, row], full[0, 9 - pad :].float()) < 3e-2


@pytest.mark.parametrize("rule", ["slide", "crop"])
def test_past_the_context_graph_replays_equal_eager(rule):
    # 3x max_seq_len new tokens: decode graph, then crop's window graph or slide's re-prefills.
    model = small_model("rope", kv_heads=1, max_seq_len=64)
    idx, mask = prompts(3, 20, lengths=[20, 7, 13], seed=8)
    runs = []
    for graph in (True, False):
        engine = InferenceEngine(model, batch_size=3, cuda_graph=graph)
        gen = torch.Generator(device="cuda").manual_seed(4)
        runs.append(
            engine.generate(
                idx, GenerationConfig(192, temperature=0.8, context_overflow=rule), prompt_mask=mask, generator=gen
            )
        )
    assert runs[0].shape == (3, 212)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("pos_emb,max_len", [("rope", 200), ("alibi", 1000)])
def test_the_warm_up_compiles_the_variant_the_first_decode_step_runs(pos_emb, max_len):
    """The engine's background warm-up launches the decode kernels at the step's own layout, side by
    side on threads: the first decode step compiles nothing more (a variant the warm-up missed would
    be compiled there, on the user's clock). A cache of 200 slots is one split (no combine kernel),
    one of 1000 several. The SDPA decode path starts no warm-up."""
    from mqa_lm.kernels.triton.decode import _decode_combine, _decode_split, split_plan
    from mqa_lm.kernels.triton.decode_linear import _fused_linear

    model = small_model(pos_emb, kv_heads=1, max_seq_len=max_len)
    idx, mask = prompts(2, 12, lengths=[12, 5], seed=3)
    kernels = (_decode_split, _decode_combine, _fused_linear)
    for kernel in kernels:
        kernel.device_caches.clear()  # this process's compiled variants (the disk cache stays)

    def variants() -> list[int]:
        index = torch.cuda.current_device()
        return [len(k.device_caches[index][0]) if index in k.device_caches else 0 for k in kernels]

    engine = InferenceEngine(model, batch_size=2, max_len=max_len, attention="triton")
    combines = int(split_plan(2, 1, 8, max_len, torch.device("cuda"))[1] > 1)
    engine.generate(idx, GenerationConfig(1), prompt_mask=mask)  # the prefill's token alone
    assert engine._warmup is None and variants() == [0, 0, 0]
    engine._start_decode_kernel_warmup()  # what a call of more tokens starts before its prefill
    assert engine._warmup is not None
    engine._warmup.join()
    warmed = variants()
    # The fused layers: QKV (norm), up (norm, GELU), out_proj and down (residual; one variant at
    # this width, where both take the same tile).
    assert warmed[:2] == [1, combines] and warmed[2] >= 3
    gen = torch.Generator(device="cuda").manual_seed(5)
    out = engine.generate(idx, GenerationConfig(30, temperature=0.8), prompt_mask=mask, generator=gen)
    assert out.shape == (2, 42)
    assert variants() == warmed  # the step found the warm-up's variants
    sdpa = InferenceEngine(model, batch_size=2, max_len=200, attention="sdpa")
    sdpa.generate(idx, GenerationConfig(3), prompt_mask=mask)
    assert sdpa._warmup is None


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_dependent_launches_equal_plain_launches_bit_for_bit(pos_emb):
    """On Hopper the decode kernels are programmatic dependent launches: each starts while the kernel
    before it still runs and waits in the kernel for its results. One that read an activation, the
    slot or the cache before that wait would read the previous step's values and differ from plain
    launches, which compute the same arithmetic in the same order."""
    from mqa_lm.kernels import common

    if not common.dependent_launch(torch.device("cuda")):
        pytest.skip("dependent launches need compute capability 9.0 or later")
    model = small_model(pos_emb, kv_heads=1)
    idx, mask = prompts(3, 12, lengths=[12, 5, 9], seed=7)
    runs = []
    try:
        for dependent in (True, False):
            common.DEPENDENT_LAUNCH = dependent
            engine = InferenceEngine(model, batch_size=3, max_len=200, attention="triton", keep_logits=True)
            assert engine.cuda_graph and engine.cache.fused_layers
            gen = torch.Generator(device="cuda").manual_seed(8)
            config = GenerationConfig(120, temperature=0.9, top_k=100)
            out = engine.generate(idx, config, prompt_mask=mask, generator=gen)
            runs.append((out, engine.step_logits))
    finally:
        common.DEPENDENT_LAUNCH = True
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_a_prefill_runs_no_cudnn_attention():
    """cuDNN attention builds a plan per shape, and a prefill's shape is the prompt's: the engine's
    prefill runs flash or memory-efficient SDPA instead, with the same logits as a full forward."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    def kernels(fn) -> set[str]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return {e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}

    model = small_model("rope", kv_heads=1)  # attn_impl="torch": SDPA
    q = torch.randn(1, model.config.heads, 9, 32, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, model.config.heads, 9, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 9, 9, device="cuda", dtype=torch.bool).tril()
    if not any("cudnn" in n for n in kernels(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask))):
        pytest.skip("SDPA does not pick cuDNN attention on this GPU")
    engine = InferenceEngine(model, batch_size=2, max_len=64, attention="sdpa")
    idx, mask = prompts(2, 13, lengths=[13, 8], seed=6)
    ran = kernels(lambda: engine._prefill(idx, mask))
    assert ran and not any("cudnn" in n for n in ran), sorted(ran)
    with torch.no_grad():
        logits = engine._prefill(idx, mask)
        full, _ = model(idx[:1])
    assert rel_err(logits[0], full[0, -1].float()) < 3e-2


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_fused_linear_bf16_matches_float64(rows):
    """The fused decode-step kernels at GPT-2-small sizes with the launch plan a GPU gets (the
    interpreter tests run other tiles), against float64 from the bf16 inputs."""
    import math

    from mqa_lm.kernels.triton.decode_linear import fused_linear

    gen = torch.Generator(device="cuda").manual_seed(rows)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16()

    d = 768
    for k, n, norm, activation, residual in [
        (d, d + 128, "layernorm", "none", False),
        (d, d, "none", "none", True),
        (d, 4 * d, "layernorm", "gelu_tanh", False),
        (4 * d, d, "none", "none", True),
        (d, 2 * 2048, "rmsnorm", "swiglu", False),
        (d, 50304, "layernorm", "none", False),
    ]:
        x, w, b = randn(rows, 1, k, scale=2.0), randn(n, k, scale=k**-0.5), randn(n)
        nw, nb = randn(k, scale=0.2) + 1, randn(k)
        width = n // 2 if activation == "swiglu" else n
        r = randn(rows, 1, width) if residual else None
        kwargs = (
            {} if norm == "none" else dict(norm=norm, norm_weight=nw, norm_bias=nb if norm == "layernorm" else None)
        )
        out = torch.full((rows, 1, width), float("nan"), device="cuda", dtype=torch.bfloat16)
        out.copy_(fused_linear(x, w, b, activation=activation, residual=r, **kwargs))
        h = x.double()
        if norm == "layernorm":
            h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
            h = h * nw.double() + nb.double()
        elif norm == "rmsnorm":
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
        y = h @ w.double().T + b.double()
        if activation == "gelu_tanh":
            y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
        elif activation == "swiglu":
            gate, up = y.chunk(2, dim=-1)
            y = gate * torch.sigmoid(gate) * up
        if r is not None:
            y = y + r.double()
        assert not out.isnan().any()
        # bf16 rounds the normalised input and the output (2^-8 relative); a wrong column, row or
        # tile edge is O(1).
        assert rel_err(out, y) < 1e-2, (k, n, norm, activation)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_k=50)])
def test_a_prompt_from_the_host_generates_what_one_on_the_device_does(sampling):
    """stream() takes a prompt from the CPU (the prefill then counts padding and positions there,
    and the first token is written without the device-side round index): the same tokens and logits,
    bit for bit, as the same prompt on the device, padded rows and the crop rule included."""
    model = small_model("learned", kv_heads=1, max_seq_len=64)
    idx, mask = prompts(3, 12, lengths=[12, 5, 9], seed=7)
    for rule, new in (("slide", 100), ("crop", 70)):
        runs = []
        for where in ("cuda", "cpu"):
            engine = InferenceEngine(model, batch_size=3, max_len=64, keep_logits=True)
            gen = torch.Generator(device="cuda").manual_seed(5)
            config = GenerationConfig(new, context_overflow=rule, **sampling)
            out = engine.generate(idx.to(where), config, prompt_mask=mask.to(where), generator=gen)
            assert out.device.type == where
            runs.append((out.cpu(), engine.step_logits.clone(), engine.pad.clone()))
        (out_a, logits_a, pad_a), (out_b, logits_b, pad_b) = runs
        assert torch.equal(out_a, out_b), rule
        assert torch.equal(logits_a, logits_b), rule
        assert torch.equal(pad_a, pad_b), rule
