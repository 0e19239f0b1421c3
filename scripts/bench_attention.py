"""Benchmark attention kernels on MQA shapes: TFLOP/s of the forward and of forward+backward.

FLOPs = 4 * batch * heads * seq^2 * head_dim for the forward (halved when causal) and 2.5 times
that for the backward, so forward+backward counts 3.5 times the forward. Every implementation
runs in the same process on the same inputs: ours (attn_impl='triton'), PyTorch SDPA pinned to
its flash, cuDNN and memory-efficient backends (enable_gqa=True, K/V never repeated), and
FlashAttention-4 / flash-attn when importable. Also reports the peak memory a forward+backward
allocates beyond its inputs, and how far our outputs and gradients are from SDPA-flash's.

    python scripts/bench_attention.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEVICE = "cuda"
Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def sdpa(backend_name: str) -> Attn:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    expand = []  # set once this backend has refused enable_gqa

    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            if not expand:
                try:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                except RuntimeError:
                    expand.append(True)
                    print(f"note: SDPA {backend_name} refused enable_gqa; timing it with K/V repeated per head")
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    run.expanded = expand  # type: ignore[attr-defined]
    return run


def implementations() -> dict[str, Attn]:
    from mqa_lm.kernels.triton.attention import triton_attention

    impls: dict[str, Attn] = {
        "ours": lambda q, k, v, causal: triton_attention(q, k, v, causal=causal),
        "sdpa-flash": sdpa("FLASH_ATTENTION"),
        "sdpa-cudnn": sdpa("CUDNN_ATTENTION"),
        "sdpa-efficient": sdpa("EFFICIENT_ATTENTION"),
    }
    # FlashAttention takes [batch, seq, heads, head_dim]; transposed views keep the inputs shared.
    try:
        from flash_attn.cute import flash_attn_func as fa4

        def run_fa4(q, k, v, causal):
            out = fa4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

        impls["fa4"] = run_fa4
    except Exception:  # noqa: BLE001 - not installed or not built for this card
        pass
    try:
        from flash_attn import flash_attn_func as fa2

        impls["flash-attn"] = lambda q, k, v, causal: fa2(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal
        ).transpose(1, 2)
    except Exception:  # noqa: BLE001
        pass
    return impls


def fwd_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_shape(impls: dict[str, Attn], batch, heads, seq, head_dim, causal, warmup, rep) -> dict:
    from triton.testing import do_bench

    gen = torch.Generator(device=DEVICE).manual_seed(seq * head_dim + causal)
    dt = torch.bfloat16
    q = torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dt, generator=gen).requires_grad_()
    k = torch.randn(batch, 1, seq, head_dim, device=DEVICE, dtype=dt, generator=gen).requires_grad_()
    v = torch.randn(batch, 1, seq, head_dim, device=DEVICE, dtype=dt, generator=gen).requires_grad_()
    grad = torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dt, generator=gen)
    flops = fwd_flops(batch, heads, seq, head_dim, causal)
    row = {
        "batch": batch,
        "heads": heads,
        "kv_heads": 1,
        "seq": seq,
        "head_dim": head_dim,
        "causal": causal,
        "impls": {},
    }
    outputs = {}
    for name, fn in impls.items():
        entry: dict = {}
        try:

            def step(fn=fn):
                fn(q, k, v, causal).backward(grad)

            out = fn(q, k, v, causal)
            out.backward(grad)
            outputs[name] = (out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
            q.grad = k.grad = v.grad = None
            # Compiling/autotuning above can leave the GPU idle long enough for its clocks to drop.
            warm_up_gpu(0.5)
            ms_fwd = do_bench(lambda fn=fn: fn(q, k, v, causal), warmup=warmup, rep=rep, return_mode="median")
            ms_step = do_bench(step, warmup=warmup, rep=rep, grad_to_none=[q, k, v], return_mode="median")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            entry = {
                "kv_repeated": bool(getattr(fn, "expanded", False)),
                "fwd_ms": ms_fwd,
                "fwd_bwd_ms": ms_step,
                "fwd_tflops": flops / ms_fwd * 1e-9,
                "fwd_bwd_tflops": 3.5 * flops / ms_step * 1e-9,
                "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
            }
            q.grad = k.grad = v.grad = None
        except Exception as err:  # noqa: BLE001 - a backend that cannot run this shape is reported
            entry = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"}
            q.grad = k.grad = v.grad = None
        row["impls"][name] = entry
    if "ours" in outputs and "sdpa-flash" in outputs:
        row["ours_vs_flash_rel_diff"] = {
            n: rel_diff(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), outputs["ours"], outputs["sdpa-flash"])
        }
    return row


def warm_up_gpu(seconds: float) -> None:
    """Run matrix products for a while so the first shape is not timed at idle clocks."""
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def ratio(row: dict, a: str, b: str, key: str = "fwd_bwd_tflops") -> float | None:
    x, y = row["impls"].get(a, {}), row["impls"].get(b, {})
    if key in x and key in y:
        return x[key] / y[key]
    return None


def fmt(x: float | None, spec: str = "6.1f") -> str:
    return format(x, spec) if x is not None else "   n/a"


def print_table(rows: list[dict], names: list[str]) -> None:
    print("\nTFLOP/s (fwd | fwd+bwd); ratios are fwd+bwd; mem = peak MiB beyond inputs for fwd+bwd")
    head = f"{'d':>4} {'h':>3} {'seq':>5} {'b':>3} {'causal':>6} | " + " | ".join(f"{n:>15}" for n in names)
    head += " | ours/flash ours/cudnn ours/fa4 | mem ours/flash"
    print(head)
    print("-" * len(head))
    for row in rows:
        cells = []
        for n in names:
            e = row["impls"].get(n, {})
            cells.append(
                f"{fmt(e.get('fwd_tflops'))} {fmt(e.get('fwd_bwd_tflops'))}   " if "fwd_tflops" in e else f"{'err':>15}"
            )
        mem_o = row["impls"].get("ours", {}).get("peak_extra_mib")
        mem_f = row["impls"].get("sdpa-flash", {}).get("peak_extra_mib")
        print(
            f"{row['head_dim']:>4} {row['heads']:>3} {row['seq']:>5} {row['batch']:>3} {str(row['causal']):>6} | "
            + " | ".join(cells)
            + f" | {fmt(ratio(row, 'ours', 'sdpa-flash'), '10.2f')} {fmt(ratio(row, 'ours', 'sdpa-cudnn'), '11.2f')}"
            + f" {fmt(ratio(row, 'ours', 'fa4'), '8.2f')} | {fmt(mem_o, '7.0f')}/{fmt(mem_f, '.0f')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--impls", nargs="+", default=None, help="subset of implementations to run")
    parser.add_argument("--warmup", type=int, default=25, help="ms, per measurement")
    parser.add_argument("--rep", type=int, default=100, help="ms, per measurement")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")
    for seq in args.seqs:
        if args.tokens % seq:
            raise SystemExit(f"--tokens={args.tokens} must be a multiple of every --seqs value, not of {seq}")

    warm_up_gpu(2.0)
    impls = implementations()
    if args.impls:
        unknown = set(args.impls) - set(impls)
        if unknown:
            raise SystemExit(f"unknown or unavailable implementations {sorted(unknown)}; available: {sorted(impls)}")
        impls = {n: impls[n] for n in args.impls}
    causal_values = {"both": [True, False], "yes": [True], "no": [False]}[args.causal]
    rows = []
    for head_dim in args.head_dims:
        heads = 2048 // head_dim  # model width 2048: 32 heads of 64, 16 of 128
        for causal in causal_values:
            for seq in args.seqs:
                row = bench_shape(impls, args.tokens // seq, heads, seq, head_dim, causal, args.warmup, args.rep)
                rows.append(row)
                print(json.dumps(row), flush=True)

    from bench_env import benchmark_environment

    print_table(rows, list(impls))
    result = {
        **benchmark_environment(),
        "flops": "fwd = 4*b*h*s^2*d (/2 causal); fwd+bwd = 3.5 * fwd",
        "rows": rows,
    }
    print("\nautotuned configs:")
    for key, config in result["configs"].items():
        print(f"  {key}: {config}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
