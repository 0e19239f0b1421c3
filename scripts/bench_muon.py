"""The Muon step alone on one GPU: ours (batched, foreach), ``torch.optim.Muon`` and fused AdamW over
the same model's matrices, beside the Newton-Schulz FLOPs that bound it.

    python scripts/bench_muon.py                       # gpt2_small and mqa_1b
    python scripts/bench_muon.py --models gpt2_small --steps 50

Each model's Muon matrices (the 2-D weights of its blocks) get random gradients; a step is timed
with CUDA events around ``optimizer.step()`` after warm-up (median of ``--steps``). The floor is
``ns_steps * (4 m^2 n + 2 m^3)`` FLOPs per m x n matrix (m <= n) at the card's bf16 dense peak.
Per shape, the batched Newton-Schulz alone is timed with the symmetric products whole (``splits``
1) and by 2 and 4 row blocks, beside the FLOPs each form does (what ``SYMMETRIC_MIN_ROWS`` is chosen
from); the step is timed with the automatic choice and with the plain form.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mqa_lm.optim.muon as muon_module  # noqa: E402
from mqa_lm.model import MQAConfig, MQATransformer  # noqa: E402
from mqa_lm.optim import Muon, split_parameters  # noqa: E402

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16


def ns_flops(params: list[torch.Tensor], steps: int) -> float:
    total = 0.0
    for p in params:
        m, n = sorted(p.shape)
        total += steps * (4 * m * m * n + 2 * m**3)
    return total


def time_calls(fn, n: int) -> float:
    """Median milliseconds of one ``fn()`` (CUDA events, after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_steps(optimizer: torch.optim.Optimizer, n: int) -> float:
    """Median milliseconds of one ``optimizer.step()``."""
    return time_calls(optimizer.step, n)


def ns_shapes(params: list[torch.Tensor], steps: int, n: int) -> list[dict]:
    """The batched iteration alone per wide shape, whole and by row blocks of the symmetric products."""
    counts: dict[tuple[int, int], int] = {}
    for p in params:
        m, k = sorted(p.shape)
        counts[(m, k)] = counts.get((m, k), 0) + 1
    rows = []
    for (m, k), count in sorted(counts.items()):
        x = torch.randn(count, m, k, device="cuda", dtype=torch.bfloat16)
        row: dict = {"shape": [count, m, k], "auto_splits": muon_module.symmetric_splits(m, k, x.device), "forms": {}}
        for splits in (1, 2, 4):
            if m % splits or (splits > 1 and m // splits < 128):
                continue
            sym = (splits + 1) / (2 * splits)  # the share of the two symmetric products computed
            flops = steps * count * (2 * m * m * k * sym + 2 * m**3 * sym + 2 * m * m * k)
            ms = time_calls(functools.partial(muon_module.newton_schulz, x, steps, splits=splits), n)
            row["forms"][splits] = {"ms": ms, "tflop": flops / 1e12, "tflops": flops / (ms / 1e3) / 1e12}
        rows.append(row)
        del x
    return rows


def bench_model(name: str, steps: int) -> dict:
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml"))
    fields = {k: v for k, v in fields.items() if k in MQAConfig.__dataclass_fields__}
    fields.update(vocab_size=50304)
    with torch.device("cuda"):
        model = MQATransformer(MQAConfig(**fields))
    matrices = split_parameters(model, muon=True)["muon"]
    for p in matrices:
        p.grad = torch.randn_like(p)
    flops = ns_flops(matrices, 5)
    kwargs = dict(lr=0.01, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn="original")
    out: dict = {
        "model": name,
        "matrices": len(matrices),
        "shapes": sorted({tuple(p.shape) for p in matrices}),
        "ns_tflop": flops / 1e12,
        "ns_floor_ms": flops / PEAK_BF16 * 1e3,
    }
    out["ns_shapes"] = ns_shapes(matrices, 5, steps)
    out["ours_ms"] = time_steps(Muon(matrices, **kwargs), steps)
    # The same with the symmetric products whole (the form before row blocks).
    most = muon_module.SYMMETRIC_MAX_SPLITS
    muon_module.SYMMETRIC_MAX_SPLITS = 1
    try:
        out["ours_plain_ms"] = time_steps(Muon(matrices, **kwargs), steps)
    finally:
        muon_module.SYMMETRIC_MAX_SPLITS = most
    out["torch_muon_ms"] = time_steps(torch.optim.Muon(matrices, **kwargs), steps)
    out["adamw_fused_ms"] = time_steps(torch.optim.AdamW(matrices, lr=1e-3, fused=True), steps)
    out["ours_tflops"] = flops / (out["ours_ms"] / 1e3) / 1e12
    del model, matrices
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2_small", "mqa_1b"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "bench_muon.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_muon.py times the step on a CUDA GPU; none is visible")
    results = [bench_model(name, args.steps) for name in args.models]
    print(f"\n{torch.cuda.get_device_name()}, Muon step over every block matrix (median of {args.steps})")
    print(
        f"{'model':<12} {'NS TFLOP':>9} {'floor ms':>9} {'ours ms':>8} {'plain NS ms':>12} {'torch.Muon ms':>14} "
        f"{'AdamW ms':>9} {'ours TFLOP/s':>13}"
    )
    for r in results:
        print(
            f"{r['model']:<12} {r['ns_tflop']:>9.3f} {r['ns_floor_ms']:>9.2f} {r['ours_ms']:>8.2f} "
            f"{r['ours_plain_ms']:>12.2f} "
            f"{r['torch_muon_ms']:>14.2f} {r['adamw_fused_ms']:>9.2f} {r['ours_tflops']:>13.0f}"
        )
    print("\nNewton-Schulz alone per wide shape [count, m, n], by row blocks of the symmetric products:")
    print("ms (TFLOP done, TFLOP/s)")
    for r in results:
        for row in r["ns_shapes"]:
            forms = "  ".join(
                f"splits {s}: {f['ms']:.2f} ms ({f['tflop']:.2f}, {f['tflops']:.0f})" for s, f in row["forms"].items()
            )
            print(f"{r['model']:<12} {str(row['shape']):<18} auto {row['auto_splits']}  {forms}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bench_env import benchmark_environment

    args.out.write_text(json.dumps({**benchmark_environment(), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
