"""Training throughput on one GPU: ours (train.py, per attn_impl, eager and compiled), our model in a
bare PyTorch loop (the ceiling without Lightning), and nanoGPT's ``bench.py`` -- in one call.

    python scripts/bench_training.py --nanogpt .peers/nanogpt            # the full comparison
    python scripts/bench_training.py --runs torch:compiled torch:compiled:chunked bare:compiled  # a subset

A run is ``<attn_impl or bare or nanogpt>:<eager|compiled>[:<loss_impl>][@<optim>]``: ``@muon`` or
``@adamw`` picks our runs' optimizer (default: ``--optim``, adamw, nanoGPT's), e.g.
``torch:compiled@muon torch:compiled@adamw`` compares the two in one call; ``--accumulate N`` sets
``trainer.accumulate_grad_batches`` (tokens per optimizer step = batch x block x N), e.g. mqa_1b at
256k tokens a step: ``--model mqa_1b --batch 8 --block 2048 --accumulate 16 --steps 24 --log-every 3``.

The nanoGPT checkout is fetched by the user into a git-ignored folder (never vendored). Every
train.py run uses ``--model`` (gpt2_small) with ``model.vocab_size=50304``, ``--block`` (1024), ``--batch`` sequences,
bf16-mixed, no validation, checkpoints, attention maps or samples; tokens/s is the median of the
last 4 logged throughput windows. Prints a table with ours / nanoGPT-compiled measured in this call.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUIET = [
    "trainer.val_check_interval=100000",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "sample.max_new_tokens=0",
    "callbacks.model_checkpoint=null",
    "callbacks.recovery_checkpoint=null",
    "callbacks.attention_maps=null",
    "callbacks.samples=null",
]


def train_py(impl: str, compiled: bool, loss: str, optim: str, args: argparse.Namespace, run_dir: Path) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"model={args.model}",
        "model.vocab_size=50304",
        f"model.loss_impl={loss}",
        f"model.attn_impl={impl}",
        "trainer=gpu",
        f"optim={optim}",
        f"trainer.accumulate_grad_batches={args.accumulate}",
        f"trainer.max_steps={args.steps}",
        f"trainer.log_every_n_steps={args.log_every}",
        "data=stdlib",
        "data.vocab_size=8192",
        f"data.block_size={args.block}",
        f"data.batch_size={args.batch}",
        f"module.compile={'true' if compiled else 'false'}",
        f"hydra.run.dir={run_dir}",
        *QUIET,
        *args.override,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    metrics = sorted(run_dir.rglob("metrics.csv"))
    rates, mfus = [], []
    if metrics:
        with open(metrics[0]) as f:
            for row in csv.DictReader(f):
                if row.get("throughput/tokens_per_sec"):
                    rates.append(float(row["throughput/tokens_per_sec"]))
                    mfus.append(float(row.get("throughput/mfu") or "nan"))
    if proc.returncode != 0 or not rates:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"error": f"rc {proc.returncode}", "tail": tail, "wall_s": wall}
    compile_line = re.search(r"compile \+ first step: ([\d.]+) s", proc.stdout + proc.stderr)
    return {
        "tokens_per_s": statistics.median(rates[-4:]),
        "mfu": statistics.median(mfus[-4:]),
        "wall_s": wall,
        "compile_s": float(compile_line.group(1)) if compile_line else None,
    }


def bare_loop(compiled: bool, loss: str, optim: str, args: argparse.Namespace) -> dict:
    """Our model, bf16 autocast, random tokens, no accumulation: the model math without Lightning.
    ``adamw``: one fused AdamW over every parameter (nanoGPT's); ``muon``: ``build_optimizer`` with
    ``optim=muon``'s defaults, as train.py builds it. CUDA events split each step's GPU time into
    forward + backward and the optimizer step (clipping included)."""
    import torch
    from omegaconf import OmegaConf

    from mqa_lm.model import MQAConfig, MQATransformer
    from mqa_lm.optim import OPTIMIZERS, build_optimizer

    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{args.model}.yaml"))
    fields = {k: v for k, v in fields.items() if k in MQAConfig.__dataclass_fields__}
    fields.update(vocab_size=50304, attn_impl="torch", loss_impl=loss)
    torch.manual_seed(0)
    model = MQATransformer(MQAConfig(**fields)).cuda()
    if optim == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    else:
        opt = build_optimizer(model, OPTIMIZERS[optim]())
    step_model = torch.compile(model) if compiled else model
    x = torch.randint(50304, (args.batch, args.block), device="cuda")
    y = torch.randint(50304, (args.batch, args.block), device="cuda")
    n = 30
    marks = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(n)]

    def step(events: list | None = None) -> None:
        if events:
            events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_model(x, y)
        loss.backward()
        if events:
            events[1].record()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if events:
            events[2].record()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for events in marks:
        step(events)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / n
    tokens = args.batch * args.block / dt
    peak = 989e12
    return {
        "tokens_per_s": tokens,
        "mfu": model.flops_per_token(args.block) * tokens / peak,
        "wall_s": None,
        "step_ms": 1e3 * dt,
        "fwd_bwd_ms": statistics.median(e[0].elapsed_time(e[1]) for e in marks),
        "optimizer_ms": statistics.median(e[1].elapsed_time(e[2]) for e in marks),
        # A step slower than its kernels often means the allocator freed its cache and retried.
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
        "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def nanogpt(nanogpt_dir: Path, compiled: bool, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "bench.py",
        "--real_data=False",
        f"--batch_size={args.batch}",
        f"--compile={compiled}",
        "--profile=False",
    ]
    proc = subprocess.run(cmd, cwd=nanogpt_dir, capture_output=True, text=True, timeout=args.timeout)
    found = re.findall(r"time per iteration: ([\d.]+)ms", proc.stdout)
    if proc.returncode != 0 or not found:
        return {"error": f"rc {proc.returncode}", "tail": (proc.stdout + proc.stderr)[-3000:]}
    ms = float(found[-1])
    return {"tokens_per_s": args.batch * 1024 / (ms / 1e3), "ms_per_iter": ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs",
        nargs="+",
        default=[
            "torch:eager",
            "torch:compiled",
            "triton:eager",
            "triton:compiled",
            "bare:compiled",
            "nanogpt:compiled",
            "nanogpt:eager",
        ],
    )
    parser.add_argument("--nanogpt", type=Path, default=ROOT / ".peers" / "nanogpt")
    parser.add_argument("--model", default="gpt2_small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=1024, help="sequence length of our runs (nanoGPT's is 1024)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--optim", default="adamw", help="our runs' optimizer unless a run names one (@muon)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (train.py runs)")
    parser.add_argument("--log-every", type=int, default=10, help="optimizer steps per logged throughput window")
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "bench_training.json")
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/bench_training_runs"))
    parser.add_argument("override", nargs="*", help="extra train.py overrides for our runs")
    args = parser.parse_args()
    # Throughput appears once the monitor's window (5 logging steps) is full, and the result is the
    # median of the last 4 windows: fewer than 8 logged steps give no number at all.
    if args.steps < 8 * args.log_every:
        parser.error(
            f"--steps {args.steps} is too few: the throughput median needs 8 logged steps, "
            f"at least {8 * args.log_every} with --log-every {args.log_every}"
        )

    results: dict[str, dict] = {}
    for run in args.runs:
        spec, _, optim = run.partition("@")
        impl, mode, *rest = spec.split(":")
        compiled = mode == "compiled"
        loss = rest[0] if rest else "torch"
        if impl == "nanogpt":
            res = nanogpt(args.nanogpt, compiled, args)
        elif impl == "bare":
            res = bare_loop(compiled, loss, optim or args.optim, args)
        else:
            # A fresh directory per run: an earlier call's metrics.csv or checkpoint must not be read or resumed.
            args.runs_dir.mkdir(parents=True, exist_ok=True)
            run_dir = Path(tempfile.mkdtemp(prefix=run.replace(":", "_") + "-", dir=args.runs_dir))
            res = train_py(impl, compiled, loss, optim or args.optim, args, run_dir)
        results[run] = res
        print(json.dumps({"run": run, **{k: v for k, v in res.items() if k != "tail"}}), flush=True)
        if "tail" in res:
            print(res["tail"], flush=True)

    base = results.get("nanogpt:compiled", {}).get("tokens_per_s") or next(iter(results.values())).get("tokens_per_s")
    tokens = args.batch * args.block * args.accumulate
    print(
        f"\n{args.model}, batch {args.batch} x {args.block} x accumulate {args.accumulate} "
        f"({tokens:,} tokens a step), bf16"
    )
    print("ratio = tokens/s over nanoGPT compiled, else over the first run (same call)")
    print(f"{'run':<26} {'tokens/s':>10} {'MFU':>7} {'ratio':>7} {'compile s':>10}")
    for run, res in results.items():
        rate = res.get("tokens_per_s")
        if rate is None:
            print(f"{run:<26} {'failed':>10}")
            continue
        mfu = res.get("mfu")
        ratio = f"{rate / base:.2f}" if base else "-"
        mfu_s = f"{100 * mfu:.1f}%" if isinstance(mfu, float) and mfu == mfu else "-"
        comp = f"{res['compile_s']:.1f}" if res.get("compile_s") else "-"
        print(f"{run:<26} {rate:>10,.0f} {mfu_s:>7} {ratio:>7} {comp:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bench_env import benchmark_environment

    args.out.write_text(json.dumps({**benchmark_environment(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
