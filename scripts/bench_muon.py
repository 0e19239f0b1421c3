"""The Muon step alone on one GPU: ours (batched, foreach), ``torch.optim.Muon`` and fused AdamW over
the same model's matrices, beside the Newton-Schulz FLOPs that bound it.

    python scripts/bench_muon.py                       # gpt2_small and mqa_1b
    python scripts/bench_muon.py --models gpt2_small --steps 50

Each model's Muon matrices (the 2-D weights of its blocks) get random gradients; a step is timed
with CUDA events around ``optimizer.step()`` after warm-up (median of ``--steps``). The floor is
``ns_steps * (4 m^2 n + 2 m^3)`` FLOPs per m x n matrix (m <= n) at the card's bf16 dense peak.
"""

from __future__ import annotations

import argparse
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


def time_steps(optimizer: torch.optim.Optimizer, n: int) -> float:
    """Median milliseconds of one ``optimizer.step()``."""
    for _ in range(5):
        optimizer.step()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        optimizer.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
    out["ours_ms"] = time_steps(Muon(matrices, **kwargs), steps)
    # The same with the iteration compiled (one graph per batch shape), to see whether compiling it pays.
    eager = muon_module.newton_schulz
    muon_module.newton_schulz = torch.compile(eager, dynamic=False)
    try:
        out["ours_compiled_ms"] = time_steps(Muon(matrices, **kwargs), steps)
    finally:
        muon_module.newton_schulz = eager
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
        f"{'model':<12} {'NS TFLOP':>9} {'floor ms':>9} {'ours ms':>8} {'compiled ms':>12} {'torch.Muon ms':>14} "
        f"{'AdamW ms':>9} {'ours TFLOP/s':>13}"
    )
    for r in results:
        print(
            f"{r['model']:<12} {r['ns_tflop']:>9.3f} {r['ns_floor_ms']:>9.2f} {r['ours_ms']:>8.2f} "
            f"{r['ours_compiled_ms']:>12.2f} "
            f"{r['torch_muon_ms']:>14.2f} {r['adamw_fused_ms']:>9.2f} {r['ours_tflops']:>13.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bench_env import benchmark_environment

    args.out.write_text(json.dumps({**benchmark_environment(), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
