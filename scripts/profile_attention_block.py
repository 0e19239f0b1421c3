"""Profile one MultiQueryAttention block forward+backward per ``attn_impl``, as training runs it.

The block (fp32 parameters, bf16 autocast, q/k/v as strided views of one fused QKV projection) is
timed for every implementation in the same process, next to the bare kernels on the same shapes
(contiguous [b, h, s, d] inputs, and the block's strided views), so the gap between a kernel in
isolation and inside the model shows up in one table. Per variant it reports:

* ``gpu ms``: one step's time, from CUDA events around ``--iters`` steps issued back to back;
* ``host ms``: the Python time to issue one step (when it nears ``gpu ms``, the host is the limit);
* ``syncs``: host synchronisations in one step (``torch.cuda.set_sync_debug_mode``);
* the top CUDA kernels of one step (``torch.profiler``);
* with ``--host-profile``, where the host time goes (cProfile).

Optionally (``--model-steps``) a whole gpt2_small-shaped MQATransformer step per implementation,
in tokens/s. Needs a CUDA GPU; no Hydra.

    python scripts/profile_attention_block.py --json profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqa_lm.model import MQAConfig, MQATransformer  # noqa: E402
from mqa_lm.nn.attention import MultiQueryAttention  # noqa: E402

Step = Callable[[], None]


def block_step(impl: str, args: argparse.Namespace) -> Step:
    """One block forward+backward under bf16 autocast, parameter grads reset as an optimizer would."""
    block = MultiQueryAttention(dim=args.dim, heads=args.heads, kv_heads=args.kv_heads, attn_impl=impl, device="cuda")
    x = torch.randn(args.batch, args.seq, args.dim, device="cuda", requires_grad=True)
    grad = torch.randn(args.batch, args.seq, args.dim, device="cuda")
    params = [x, *block.parameters()]

    def step() -> None:
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _, _ = block(x)
        y.backward(grad)

    return step


def kernel_step(impl: str, layout: str, args: argparse.Namespace) -> Step:
    """The bare attention call fwd+bwd: ``contiguous`` q [b,h,s,d], k/v [b,kv,s,d], or ``qkv``
    views of one [b, s, (h + 2 kv) d] tensor, the layout the block hands the kernels."""
    b, s, h, kv = args.batch, args.seq, args.heads, args.kv_heads
    d = args.dim // h
    dt = torch.bfloat16
    if layout == "contiguous":
        q = torch.randn(b, h, s, d, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(b, kv, s, d, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(b, kv, s, d, device="cuda", dtype=dt, requires_grad=True)
        leaves = [q, k, v]

        def inputs():
            return q, k, v
    else:
        qkv = torch.randn(b, s, (h + 2 * kv) * d, device="cuda", dtype=dt, requires_grad=True)
        leaves = [qkv]

        def inputs():
            qq, kk, vv = qkv.split([h * d, kv * d, kv * d], dim=-1)
            return (
                qq.view(b, s, h, d).transpose(1, 2),
                kk.view(b, s, kv, d).transpose(1, 2),
                vv.view(b, s, kv, d).transpose(1, 2),
            )

    grad = torch.randn(b, s, h, d, device="cuda", dtype=dt).transpose(1, 2)
    if impl == "triton":
        from mqa_lm.kernels.triton.attention import triton_attention

        def attend(q, k, v):
            return triton_attention(q, k, v, causal=True)
    else:

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)

    def step() -> None:
        for t in leaves:
            t.grad = None
        attend(*inputs()).backward(grad)

    return step


def model_step(impl: str, args: argparse.Namespace) -> Step:
    cfg = MQAConfig(
        vocab_size=50304,
        max_seq_len=args.seq,
        n_layers=12,
        d_model=args.dim,
        heads=args.heads,
        kv_heads=args.kv_heads,
        attn_impl=impl,
    )
    model = MQATransformer(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()

    return step


def time_step(step: Step, warmup: int, iters: int, repeats: int = 3) -> dict:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        t1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / iters)
        host.append((t1 - t0) * 1e3 / iters)
    return {"gpu_ms": statistics.median(gpu), "host_ms": statistics.median(host)}


def count_syncs(step: Step) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def top_kernels(step: Step, steps: int, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = e.self_cuda_time_total
        if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA") and us > 0:
            rows.append({"kernel": e.key, "calls": e.count / steps, "us": us / steps})
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    for r in rows:
        r["share"] = r["us"] / total if total else 0.0
    return [{"kernel": "(all kernels)", "calls": sum(r["calls"] for r in rows), "us": total, "share": 1.0}] + rows[:top]


def profile_variant(name: str, step: Step, args: argparse.Namespace) -> dict:
    step()  # compile / autotune outside every measurement
    torch.cuda.synchronize()
    entry = {"name": name, **time_step(step, args.warmup, args.iters)}
    entry["syncs"] = count_syncs(step)
    entry["kernels"] = top_kernels(step, args.profile_steps, args.top)
    print(json.dumps({k: v for k, v in entry.items() if k != "kernels"}), flush=True)
    return entry


def host_profile(step: Step, steps: int, top: int) -> None:
    """Where the host time of a step goes (cProfile, sorted by own time)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def print_report(entries: list[dict], baseline: str) -> None:
    base = next((e["gpu_ms"] for e in entries if e["name"] == baseline), None)
    print(f"\n{'variant':<28} {'gpu ms':>8} {'host ms':>8} {'syncs':>5} {'kernels ms':>10} {'vs ' + baseline:>12}")
    for e in entries:
        rel = f"{e['gpu_ms'] / base:12.2f}" if base else f"{'n/a':>12}"
        kern = e["kernels"][0]["us"] / 1e3
        print(f"{e['name']:<28} {e['gpu_ms']:8.3f} {e['host_ms']:8.3f} {e['syncs']:5d} {kern:10.3f} {rel}")
    for e in entries:
        print(f"\n{e['name']}: top CUDA kernels per step")
        for r in e["kernels"]:
            print(f"  {r['us']:9.1f} us {r['calls']:5.1f}x {100 * r['share']:5.1f}%  {r['kernel'][:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=["torch", "flash", "triton"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--model-steps", type=int, default=0, help="also time a 12-layer model step (iters)")
    parser.add_argument("--host-profile", nargs="*", default=[], help="cProfile the block step of these impls")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_attention_block.py needs a CUDA GPU")
    if args.dim % args.heads or args.heads % args.kv_heads:
        raise SystemExit(
            f"--dim {args.dim} must divide by --heads {args.heads}, and heads by --kv-heads {args.kv_heads}"
        )

    # Warm the clocks so the first variant is not timed at idle frequency.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(200):
        a @ a
    torch.cuda.synchronize()

    entries = []
    for impl in args.impls:
        entries.append(profile_variant(f"block/{impl}", block_step(impl, args), args))
    for impl in ("sdpa", "triton"):
        if impl == "triton" and "triton" not in args.impls:
            continue
        for layout in ("contiguous", "qkv"):
            entries.append(profile_variant(f"kernel/{impl}/{layout}", kernel_step(impl, layout, args), args))
    print_report(entries, f"block/{args.impls[0]}")
    for impl in args.host_profile:
        print(f"\nhost profile, block/{impl}, {args.profile_steps * 10} steps:")
        step = block_step(impl, args)
        step()
        host_profile(step, args.profile_steps * 10, 2 * args.top)

    models = {}
    if args.model_steps:
        tokens = args.batch * args.seq
        for impl in args.impls:
            step = model_step(impl, args)
            step()
            t = time_step(step, 3, args.model_steps, repeats=2)
            models[impl] = {**t, "tokens_per_s": tokens / t["gpu_ms"] * 1e3}
            print(json.dumps({"model": impl, **models[impl]}), flush=True)
            del step
            torch.cuda.empty_cache()

    from bench_env import benchmark_environment

    result = {
        **benchmark_environment(),
        "shape": {k: getattr(args, k) for k in ("batch", "seq", "dim", "heads", "kv_heads")},
        "entries": entries,
        "model": models,
    }
    print("\nautotuned configs:", json.dumps(result["configs"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
