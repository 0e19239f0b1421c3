"""The decode step's linear layers: our fused Triton kernels against the unfused torch ops they replace.

For each layer of a GPT-2-small block (d_model 768, MQA: QKV 768->896 after a LayerNorm, out_proj
768->768 plus the residual, up 768->3072 after a LayerNorm with GELU, down 3072->768 plus the
residual) and the LM head (768->50304 after the final norm), at 1 and 16 rows, bf16: the microseconds
of one call of the torch ops (``F.layer_norm``, ``F.linear``, ``F.gelu``, ``+``) and of
:func:`~mqa_lm.kernels.triton.decode_linear.fused_linear`, with its default launch and with each
launch of a sweep (``--sweep``). Each timing replays a CUDA graph of 50 calls over 8 weight copies
(larger than L2), so it is what a captured decode step pays: kernel time and the gaps between kernels,
no launch overhead, no cache hits. Beside it, the floor: the weight bytes at the card's copy bandwidth,
and the fused kernel launched plainly ("no PDL") and as a dependent launch that does not prefetch its
weights ("no pref"): what each part of the default (a dependent launch with the prefetch) gains.

    python scripts/bench_decode_linear.py [--sweep] [--rows 1 16] [--d-model 768]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqa_lm.kernels import common  # noqa: E402
from mqa_lm.kernels.triton import decode_linear  # noqa: E402
from mqa_lm.kernels.triton.decode_linear import fused_linear, plan  # noqa: E402

CALLS = 50
COPIES = 8


def graph_us(fn, copies: int) -> float:
    """Microseconds per call of ``fn(i)`` replayed in a CUDA graph of CALLS calls over ``copies`` inputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(4):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (4 * CALLS))
    return best


def layers(d: int, vocab: int) -> dict:
    """name -> (in, out, norm, activation, residual, bias)."""
    return {
        "qkv (LN)": (d, d + 2 * (d // 12), True, "none", False, True),
        "out_proj (+res)": (d, d, False, "none", True, True),
        "up (LN, gelu)": (d, 4 * d, True, "gelu_tanh", False, True),
        "down (+res)": (4 * d, d, False, "none", True, True),
        "lm_head (LN)": (d, vocab, True, "none", False, False),
    }


def bench_layer(name: str, shape: tuple, rows_list: list[int], copy_gbs: float, sweep: list | None) -> None:
    k, n, norm, act, res, has_bias = shape
    dev, dtype = "cuda", torch.bfloat16
    copies = 2 if n > 8192 else COPIES
    weights = [torch.randn(n, k, device=dev, dtype=dtype) * 0.02 for _ in range(copies)]
    bias = torch.randn(n, device=dev, dtype=dtype) if has_bias else None
    nw, nb = torch.rand(k, device=dev, dtype=dtype) + 0.5, torch.randn(k, device=dev, dtype=dtype)
    megabytes = n * k * 2 / 1e6
    floor = megabytes / (copy_gbs / 2) * 1e3
    for rows in rows_list:
        x = torch.randn(rows, 1, k, device=dev, dtype=dtype)
        r = torch.randn(rows, 1, n, device=dev, dtype=dtype) if res else None
        kwargs: dict = dict(activation=act, residual=r)
        if norm:
            kwargs.update(norm="layernorm", norm_weight=nw, norm_bias=nb)

        def unfused(i: int, x: torch.Tensor = x, r: torch.Tensor | None = r) -> torch.Tensor:
            h = F.layer_norm(x, (k,), nw, nb) if norm else x
            y = F.linear(h, weights[i], bias)
            if act == "gelu_tanh":
                y = F.gelu(y, approximate="tanh")
            return y + r if r is not None else y

        def fused(i: int, launch: tuple | None = None, x: torch.Tensor = x, kwargs: dict = kwargs) -> torch.Tensor:
            return fused_linear(x, weights[i], bias, launch=launch, **kwargs)

        ref = unfused(0).float()
        err = ((fused(0).float() - ref).norm() / ref.norm()).item()
        t_torch, t_fused = graph_us(unfused, copies), graph_us(fused, copies)
        # The same kernel launched plainly, and as a dependent launch without the weights' prefetch.
        common.DEPENDENT_LAUNCH = False
        t_plain = graph_us(fused, copies)
        common.DEPENDENT_LAUNCH, decode_linear.PREFETCH_WEIGHTS = True, False
        t_no_prefetch = graph_us(fused, copies)
        decode_linear.PREFETCH_WEIGHTS = True
        print(
            f"{name:18s} {rows:4d} {megabytes:6.2f} {floor:8.2f} {t_torch:8.2f} {t_fused:8.2f} "
            f"{t_torch / t_fused:6.2f} {t_plain:8.2f} {t_no_prefetch:8.2f}  {plan(rows, n, k)[1:]} rel err {err:.1e}",
            flush=True,
        )
        if sweep:
            results = []
            for launch in sweep:
                if n > 8192 and launch[0] < 32:
                    continue
                try:
                    results.append((graph_us(lambda i, launch=launch: fused(i, launch), copies), launch))
                except Exception as error:  # noqa: BLE001  (out of shared memory, say)
                    print(f"    {launch}: {type(error).__name__}")
            results.sort()
            print("    best: " + ", ".join(f"{launch} {us:.2f}" for us, launch in results[:6]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--sweep", action="store_true", help="also time each launch configuration of a sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    buffer = torch.empty(2**28, device="cuda", dtype=torch.uint8)
    copy_gbs = 2 * buffer.numel() / graph_us(lambda i: buffer.clone(), 1) / 1e3
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy {copy_gbs:.0f} GB/s (read+write)")
    sweep = [(bn, bk, 4, s) for bn in (16, 32, 64) for bk in (128, 256) for s in (2, 3, 4)]
    sweep += [(16, 64, 4, 3), (16, 128, 2, 3), (16, 256, 8, 3), (16, 512, 4, 3)]
    print(
        f"{'layer':18s} {'rows':>4s} {'MB':>6s} {'floor us':>8s} {'torch us':>8s} {'fused us':>8s} {'ratio':>6s} "
        f"{'no PDL':>8s} {'no pref':>8s}"
    )
    for name, shape in layers(args.d_model, args.vocab).items():
        bench_layer(name, shape, args.rows, copy_gbs, sweep if args.sweep else None)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
