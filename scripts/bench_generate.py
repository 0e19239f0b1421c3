"""Benchmark generation and decode attention on one GPU (or a tiny smoke run on CPU).

1. Generation, GPT-2-small shape (12 layers, d 768, 12 query heads, 1 K/V head, vocab 50304,
   random weights in bf16), 32-token prompt, 512 new tokens, greedy, at batch 1 and 16:
   a plain loop over ``forward`` with a growing cache (``DynamicKVCache``, what eager HF-style
   decoding does), the engine eager, the engine as a CUDA graph
   with SDPA and with our Triton decode kernel (also with top-k/top-p sampling), and HF
   transformers' ``GPTBigCodeForCausalLM.generate`` at the same shape (dynamic and static cache).
2. Decode attention alone (one query token per row over a cache of L keys): GB/s of K/V read,
   ours vs SDPA (given exactly the L cached keys, its best case), at L = 2k/8k/32k for batch 1
   and 32 (MQA), and kv_heads 1 vs 12 at batch 16, against the card's copy bandwidth. Each timing
   replays a CUDA graph of many calls over rotating caches larger than L2, so it is the kernels'
   time with neither launch overhead nor cache hits.

    python scripts/bench_generate.py [--quick] [--compile] [--no-hf] [--json out.json]
    python scripts/bench_generate.py --profile     # kernels and GPU time of one decode step (b=1, 16)
    python scripts/bench_generate.py --sweep-attention --json s.json  # tune the decode-attention launch
    python scripts/bench_generate.py --device cpu --quick      # smoke run: tiny fp32 model, no Triton
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqa_lm import MQAConfig, MQATransformer  # noqa: E402
from mqa_lm.inference import InferenceEngine  # noqa: E402
from mqa_lm.inference.config import GenerationConfig  # noqa: E402
from mqa_lm.kernels import common  # noqa: E402
from mqa_lm.nn.cache import DynamicKVCache  # noqa: E402


@torch.no_grad()
def growing_cache_loop(model: MQATransformer, idx: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by calling forward with a DynamicKVCache: no static cache, no graph."""
    cache = DynamicKVCache()
    logits, _ = model(idx, cache=cache, logits_to_keep=1)
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new - 1):
        logits, _ = model(out[-1], cache=cache)
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([idx, *out], dim=1)


def launches(dependent: bool, fn):
    """``fn()`` with the decode kernels launched as dependent launches or plainly (captured so too)."""
    common.DEPENDENT_LAUNCH = dependent
    try:
        return fn()
    finally:
        common.DEPENDENT_LAUNCH = True


def step_replay_us(engine: InferenceEngine, replays: int = 48) -> float | None:
    """Microseconds per replay of ``engine``'s captured greedy decode step, CUDA events around
    ``replays`` replays in a row: the step alone, without the prefill, the rounds' host syncs and the
    launch of each round that a whole ``generate()`` call also pays. None without a captured step.
    Run right after a greedy ``generate()``: the replays write the cache slots after the last one
    (``replays`` more must fit) and the round buffer from its start."""
    greedy = engine.settings(GenerationConfig(1, temperature=0.0), None)
    graph = engine._graphs.get(("decode", greedy))  # the engine keeps its graphs private
    if graph is None or int(engine.cache.slot) + replays > engine.max_len:
        return None
    replays = min(replays, engine.chunk_capacity)
    engine.step.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()  # the first replay after a host sync pays the graph's upload
    start.record()
    for _ in range(replays - 1):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (replays - 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call (seconds)."""
    fn()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def build_model(args, device: torch.device, dtype: torch.dtype) -> MQATransformer:
    torch.manual_seed(0)
    config = MQAConfig(
        vocab_size=args.vocab,
        max_seq_len=args.max_seq_len,
        n_layers=args.layers,
        d_model=args.d_model,
        heads=args.heads,
        kv_heads=1,
        attn_impl="torch",
        pos_emb="learned",
    )
    return MQATransformer(config).to(device=device, dtype=dtype).eval()


def bench_generation(args, device: torch.device, dtype: torch.dtype, rows: list[dict]) -> None:
    model = build_model(args, device, dtype)
    on_cuda = device.type == "cuda"
    for batch in args.batches:
        idx = torch.randint(
            0,
            args.vocab,
            (batch, args.prompt),
            device=device,
            generator=torch.Generator(device=device).manual_seed(batch),
        )
        new = args.new_tokens
        # Every closure here and below binds what it uses as defaults: late binding was harmless
        # (each is timed in the iteration that made it) but would break if one were kept.
        variants = {
            "ours: forward loop, growing cache": lambda m=model, idx=idx, new=new: growing_cache_loop(m, idx, new),
        }
        engines = {"ours: engine eager sdpa": dict(attention="sdpa", cuda_graph=False)}
        if on_cuda:
            engines["ours: engine eager triton"] = dict(attention="triton", cuda_graph=False)
            engines["ours: engine graph sdpa"] = dict(attention="sdpa", cuda_graph=True)
            engines["ours: engine graph triton"] = dict(attention="triton", cuda_graph=True)
            # The same step with the block's layers on the model's own modules (cuBLAS, separate
            # norms and adds) instead of the fused Triton kernels: what the fusion gains.
            engines["ours: engine graph triton, unfused layers"] = dict(
                attention="triton", cuda_graph=True, fused_layers=False
            )
            # The decode kernels launched plainly instead of as dependent launches (Hopper+).
            engines["ours: engine graph triton, plain launches"] = dict(
                attention="triton", cuda_graph=True, dependent_launch=False
            )
            if args.compile:
                engines["ours: engine graph triton + inductor"] = dict(
                    attention="triton", cuda_graph=True, compile=True
                )
        engines_built: dict[str, InferenceEngine] = {}
        for name, kwargs in engines.items():
            kwargs = dict(kwargs)
            fused = kwargs.pop("fused_layers", True)
            dependent = kwargs.pop("dependent_launch", True)
            try:
                engine = InferenceEngine(model, batch, max_len=args.max_seq_len, **kwargs)
                engine.cache.fused_layers = engine.cache.fused_layers and fused
            except Exception as err:  # noqa: BLE001 - one failure must not stop the run
                rows.append(dict(section="generate", name=name, batch=batch, error=repr(err)))
                continue
            engines_built[name] = engine
            variants[name] = lambda e=engine, idx=idx, new=new, d=dependent: launches(
                d, lambda: e.generate(idx, GenerationConfig(new, temperature=0.0))
            )
            if name.endswith("graph triton"):
                gen = torch.Generator(device=device)
                variants[name + " top-k/top-p"] = lambda e=engine, idx=idx, new=new, gen=gen: e.generate(
                    idx, GenerationConfig(new, temperature=0.8, top_k=50, top_p=0.95), generator=gen.manual_seed(1)
                )
        for name, fn in variants.items():
            try:
                seconds = timed(fn, device, args.repeats)
                rows.append(
                    dict(
                        section="generate",
                        name=name,
                        batch=batch,
                        seconds=seconds,
                        tok_per_s=batch * new / seconds,
                        ms_per_step=1e3 * seconds / new,
                    )
                )
                engine = engines_built.get(name)
                step_us = step_replay_us(engine) if engine is not None and engine.cuda_graph else None
                if step_us is not None:
                    rows[-1].update(step_us=step_us, step_tok_per_s=batch * 1e6 / step_us)
            except Exception as err:  # noqa: BLE001
                rows.append(dict(section="generate", name=name, batch=batch, error=repr(err)))
                traceback.print_exc()
            print(rows[-1], flush=True)
        if not args.no_hf:
            bench_hf(args, device, dtype, batch, idx, rows)
        # The closures (and ``fn``, the last of them) hold the model now; dropping them lets
        # ``del model`` free it as before.
        del variants, fn, engines_built
    del model
    if on_cuda:
        torch.cuda.empty_cache()


def bench_hf(args, device: torch.device, dtype: torch.dtype, batch: int, idx: torch.Tensor, rows: list[dict]) -> None:
    try:
        from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

        config = GPTBigCodeConfig(
            vocab_size=args.vocab,
            n_positions=args.max_seq_len,
            n_embd=args.d_model,
            n_layer=args.layers,
            n_head=args.heads,
            multi_query=True,
            activation_function="gelu_pytorch_tanh",
        )
        torch.manual_seed(0)
        hf = GPTBigCodeForCausalLM(config).to(device=device, dtype=dtype).eval()
    except Exception as err:  # noqa: BLE001
        rows.append(dict(section="generate", name="HF GPTBigCode", batch=batch, error=repr(err)))
        print(rows[-1], flush=True)
        return
    attention_mask = torch.ones_like(idx)
    for cache in ("dynamic", "static"):
        name = f"HF GPTBigCode {cache} cache"
        kwargs = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
            attention_mask=attention_mask,
        )
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        try:
            with torch.no_grad():
                seconds = timed(lambda hf=hf, kwargs=kwargs: hf.generate(idx, **kwargs), device, 1)
            rows.append(
                dict(
                    section="generate",
                    name=name,
                    batch=batch,
                    seconds=seconds,
                    tok_per_s=batch * args.new_tokens / seconds,
                    ms_per_step=1e3 * seconds / args.new_tokens,
                )
            )
        except Exception as err:  # noqa: BLE001
            rows.append(dict(section="generate", name=name, batch=batch, error=repr(err)[:300]))
        print(rows[-1], flush=True)
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graph_time(calls, device: torch.device, replays: int = 5) -> float:
    """Seconds per call of ``calls`` (a list of closures), captured once in a CUDA graph."""
    for fn in calls[:2]:
        fn()  # compile / pick kernels outside the capture
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    sync(device)
    return start.elapsed_time(end) / 1e3 / (replays * len(calls))


def copy_bandwidth(device: torch.device) -> float:
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = graph_time([lambda: dst.copy_(src)] * 10, device)
    return 2 * src.numel() / seconds / 1e9


def decode_inputs(
    batch: int, heads: int, kv_heads: int, length: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, int]:
    """A decode-attention call's query, enough (K, V) caches to cycle through that no call finds its
    K/V in L2, the output buffer, and the K/V bytes one call reads (bf16, seeded)."""
    from mqa_lm.kernels.triton.decode import decode_bytes

    nbytes = decode_bytes(batch, kv_heads, length, head_dim, 2)
    copies = max(2, min(64, math.ceil(512 * 2**20 / nbytes)))
    gen = torch.Generator(device=device).manual_seed(0)
    like = dict(device=device, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(batch, heads, 1, head_dim, **like)
    caches = [
        (torch.randn(batch, kv_heads, length, head_dim, **like), torch.randn(batch, kv_heads, length, head_dim, **like))
        for _ in range(copies)
    ]
    return q, caches, torch.empty_like(q), nbytes


def bench_decode_attention(args, device: torch.device, rows: list[dict]) -> None:
    from mqa_lm.kernels.triton.decode import decode_attention, split_plan

    copy_gbs = copy_bandwidth(device)
    rows.append(dict(section="attention", name="copy bandwidth (read+write)", gb_per_s=copy_gbs))
    head_dim, heads = 64, 12
    cases = [(b, 1, L) for b in (1, 32) for L in args.lengths]
    cases += [(16, kvh, L) for kvh in (1, 12) for L in args.kv_lengths]
    for batch, kv_heads, length in cases:
        q, caches, out, nbytes = decode_inputs(batch, heads, kv_heads, length, head_dim, device)
        impls = {
            "ours": [lambda k=k, v=v, q=q, out=out: decode_attention(q, k, v, out=out, check=False) for k, v in caches],
            "sdpa": [
                lambda k=k, v=v, q=q, kv_heads=kv_heads: F.scaled_dot_product_attention(
                    q, k, v, enable_gqa=kv_heads != heads
                )
                for k, v in caches
            ],
        }
        if length == max(args.lengths) and kv_heads == 1:
            # Keys per program against the default plan (split_plan), to tune it.
            for size in (128, 512, 1024, 2048, 4096):
                impls[f"ours/{size}"] = [
                    lambda k=k, v=v, size=size, q=q, out=out: decode_attention(
                        q, k, v, out=out, check=False, split_size=size
                    )
                    for k, v in caches
                ]
        for name, calls in impls.items():
            try:
                seconds = graph_time(calls, device)
                gbs = nbytes / seconds / 1e9
                rows.append(
                    dict(
                        section="attention",
                        name=name,
                        batch=batch,
                        kv_heads=kv_heads,
                        length=length,
                        us=seconds * 1e6,
                        gb_per_s=gbs,
                        pct_copy=100 * gbs / copy_gbs,
                    )
                )
                if name == "ours":
                    rows[-1]["split_plan"] = split_plan(batch, kv_heads, heads, length, device)[:2]
            except Exception as err:  # noqa: BLE001
                rows.append(
                    dict(
                        section="attention",
                        name=name,
                        batch=batch,
                        kv_heads=kv_heads,
                        length=length,
                        error=repr(err)[:300],
                    )
                )
            print(rows[-1], flush=True)
        del caches
        torch.cuda.empty_cache()


def sweep_decode_attention(args, device: torch.device, rows: list[dict]) -> None:
    """Every launch of the decode-attention kernel (keys per split, key tile, warps, pipeline stages)
    at each shape, beside SDPA and the default plan, to tune :func:`split_plan` and the defaults."""
    shapes = [(b, 1, L) for b in (1, 16) for L in (256, 1024)]
    shapes += [(1, 1, 2048), (1, 1, 32768), (16, 1, 2048), (16, 1, 8192), (32, 1, 2048), (32, 1, 8192)]
    shapes += [(32, 1, 32768), (16, 12, 2048), (16, 12, 8192)]
    if args.sweep_shapes:
        shapes = args.sweep_shapes
    for batch, kv_heads, length in shapes:
        rows.append(sweep_shape(batch, kv_heads, length, device))
        torch.cuda.empty_cache()


def sweep_shape(batch: int, kv_heads: int, length: int, device: torch.device) -> dict:
    from mqa_lm.kernels.triton.decode import decode_attention, split_plan

    head_dim, heads = 64, 12
    q, caches, out, _ = decode_inputs(batch, heads, kv_heads, length, head_dim, device)
    results: dict = {}

    def measure(name, calls):
        try:
            results[name] = graph_time(calls, device) * 1e6
        except Exception as err:  # noqa: BLE001 - a launch that does not fit is skipped
            results[name] = math.inf
            print(f"  {name}: {repr(err)[:120]}", flush=True)

    gqa = kv_heads != heads
    measure("sdpa", [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa) for k, v in caches])
    measure("default", [lambda k=k, v=v: decode_attention(q, k, v, out=out, check=False) for k, v in caches])
    sizes = sorted({s for s in (128, 256, 512, 1024, 2048, 4096, 8192, length) if s <= length})
    for size in sizes:
        for launch in [(n, w, st) for n in (32, 64, 128) for w in (2, 4, 8) for st in (2, 3)]:
            calls = [
                lambda k=k, v=v, size=size, launch=launch: decode_attention(
                    q, k, v, out=out, check=False, split_size=size, launch=launch
                )
                for k, v in caches
            ]
            measure((size, *launch), calls)
    ranked = sorted((us, name) for name, us in results.items() if isinstance(name, tuple))
    plan = split_plan(batch, kv_heads, heads, length, device)[:2]
    best_us, best = ranked[0]
    print(
        f"b={batch} kvh={kv_heads} L={length}: sdpa {results['sdpa']:.1f} us, default {results['default']:.1f} "
        f"(split {plan[0]} x{plan[1]}), best {best_us:.1f} (split {best[0]}, tile {best[1]}, warps {best[2]}, "
        f"stages {best[3]}); next: " + ", ".join(f"{us:.1f} {list(n)}" for us, n in ranked[1:5]),
        flush=True,
    )
    return dict(
        section="sweep",
        batch=batch,
        kv_heads=kv_heads,
        length=length,
        sdpa_us=results["sdpa"],
        default_us=results["default"],
        default_plan=plan,
        best=[(us, list(name)) for us, name in ranked[:8]],
        all={"/".join(map(str, name)): us for name, us in results.items() if isinstance(name, tuple)},
    )


def profile_step(args, device: torch.device, dtype: torch.dtype) -> None:
    """Kernels of one eager decode step (what the CUDA graph replays) and their GPU time, per batch."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(args, device, dtype)
    steps = 16
    for batch in args.batches:
        engine = InferenceEngine(model, batch, max_len=args.max_seq_len, attention="triton", cuda_graph=False)
        idx = torch.randint(0, args.vocab, (batch, args.prompt), device=device)
        # Greedy, and generate.py's default sampling (temperature 0.8, top-k 50).
        for name, sampling in (("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=0.8, top_k=50))):
            engine.generate(idx, GenerationConfig(8, **sampling))
            sync(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.generate(idx, GenerationConfig(steps + 1, **sampling))
                sync(device)
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            kernels = sum(e.count for e in events) / (steps + 1)
            gpu_us = sum(e.self_device_time_total for e in events) / (steps + 1)
            print(
                f"\n== one decode step, eager, {name} (batch {batch}): ~{kernels:.0f} kernels, "
                f"{gpu_us:.0f} us of GPU time =="
            )
            table = prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=args.profile_rows, max_name_column_width=90
            )
            print(table)
        del engine


def print_table(rows: list[dict]) -> None:
    print("\n== generation (greedy unless noted) ==")
    # "step": the captured step replayed alone (CUDA-graph engines), beside the whole generate() call.
    print(f"{'variant':46s} {'batch':>5s} {'tok/s':>10s} {'ms/step':>9s} {'step us':>8s} {'step tok/s':>10s}")
    for r in rows:
        if r["section"] != "generate":
            continue
        if "error" in r:
            print(f"{r['name']:46s} {r['batch']:5d}  error: {r['error'][:80]}")
        else:
            step = f"{r['step_us']:8.1f} {r['step_tok_per_s']:10.0f}" if "step_us" in r else ""
            print(f"{r['name']:46s} {r['batch']:5d} {r['tok_per_s']:10.0f} {r['ms_per_step']:9.3f} {step}")
    attention = [r for r in rows if r["section"] == "attention"]
    if attention:
        print("\n== decode attention (K/V bytes read / kernel time) ==")
        print(f"{'impl':9s} {'batch':>5s} {'kvh':>4s} {'keys':>6s} {'us':>8s} {'GB/s':>8s} {'% copy':>7s}  split")
        for r in attention:
            if "batch" not in r:
                print(f"{r['name']}: {r['gb_per_s']:.0f} GB/s")
            elif "error" in r:
                print(f"{r['name']:9s} {r['batch']:5d} {r['kv_heads']:4d} {r['length']:6d}  error: {r['error'][:60]}")
            else:
                plan = "{}x{}".format(*r["split_plan"][::-1]) if "split_plan" in r else ""
                print(
                    f"{r['name']:9s} {r['batch']:5d} {r['kv_heads']:4d} {r['length']:6d} {r['us']:8.1f} "
                    f"{r['gb_per_s']:8.0f} {r['pct_copy']:6.0f}%  {plan}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer tokens, repeats and lengths")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also the engine with torch.compile (inductor) inside the CUDA graph (compiles per batch)",
    )
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only profile one eager decode step at batch 1 and 16 (kernel count and GPU time)",
    )
    parser.add_argument("--profile-rows", type=int, default=15, help="kernels listed per batch with --profile")
    parser.add_argument(
        "--sweep-attention",
        action="store_true",
        help="only decode attention: every split size and launch of our kernel per shape, beside SDPA",
    )
    parser.add_argument(
        "--sweep-shapes",
        nargs="+",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        metavar="BATCH,KV_HEADS,KEYS",
        help="with --sweep-attention: only these shapes (e.g. 32,1,32768)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu --quick for a smoke run")
    if device.type == "cuda":
        args.layers, args.d_model, args.heads, args.vocab, args.max_seq_len = 12, 768, 12, 50304, 1024
        dtype = torch.bfloat16
    else:  # a smoke run: tiny model, fp32
        args.layers, args.d_model, args.heads, args.vocab, args.max_seq_len = 2, 64, 4, 512, 128
        dtype = torch.float32
    args.prompt = 32
    args.batches = [1, 16]
    args.new_tokens = 512 if not args.quick else 64
    args.repeats = 2 if not args.quick else 1
    if device.type == "cpu":
        args.new_tokens, args.batches = 16, [1, 4]
    args.lengths = [2048, 8192, 32768] if not args.quick else [2048, 32768]
    args.kv_lengths = [2048, 8192] if not args.quick else [2048]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    if args.profile:
        if device.type != "cuda":
            parser.error("--profile needs --device cuda")
        profile_step(args, device, dtype)
        return
    rows: list[dict] = []
    start = time.perf_counter()
    if args.sweep_attention:
        if device.type != "cuda":
            parser.error("--sweep-attention needs --device cuda")
        sweep_decode_attention(args, device, rows)
        args.json and args.json.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))
        print(f"\ntotal {time.perf_counter() - start:.0f} s")
        return
    bench_generation(args, device, dtype, rows)
    if device.type == "cuda":
        bench_decode_attention(args, device, rows)
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        env = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "argv": sys.argv,
        }
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
