"""Time to quality on shakespeare_char: ours (``--experiment``, default ``shakespeare_char_muon``; a run per
seed) beside nanoGPT's ``train.py config/train_shakespeare_char.py``, in one call. Every output line of every run is
time-stamped from its own process start (start-up, data preparation and compilation included).

    python scripts/shakespeare_vs_nanogpt.py --input path/to/input.txt --nanogpt .peers/nanogpt \\
        --seeds 1337 1338 1339 --gpus 0 1 2 3 [extra overrides for our train.py ...]

The runs go to the GPUs of ``--gpus``, one run per GPU at a time, in the order nanoGPT, then ours by
seed; with fewer GPUs than runs, a GPU takes the next waiting run when its run ends (``--gpus 0``: all
one after the other). Prints nanoGPT's best val loss and when it first reached it (step, seconds), and
per seed of ours: its best and when, and when it first reached nanoGPT's best, with the ratio of the
times. Logs and ``shakespeare_vs_nanogpt.json`` go to ``--logs`` ($OUT), our run directories (with
their checkpoints) to ``--runs``. Our runs skip the end-of-run sample (``sample.max_new_tokens=0``):
it comes after training and only lengthens the call. Our data is tokenized before the timed runs, as
nanoGPT's ``prepare.py`` is (``--no-prepare``: inside each run). The nanoGPT checkout is the user's
(a git-ignored folder); its ``data/shakespeare_char/prepare.py`` reads ``input.txt`` placed beside it,
so no download runs. ``--no-nanogpt --target 1.4637`` times ours alone against a known best (e.g. one
lever switched off: ``... --no-nanogpt --target 1.4637 optim=adamw``).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEIRS = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")
OURS = re.compile(r"step (\d+): val/loss ([\d.]+)")


@dataclass
class Job:
    name: str
    cmd: list[str]
    cwd: Path
    pattern: re.Pattern
    lines: list[tuple[float, str]] = field(default_factory=list)
    wall: float = 0.0
    returncode: int | None = None
    gpu: str = ""

    def curve(self) -> list[tuple[float, int, float]]:
        """(seconds since start, step, val loss) of every validation the run printed."""
        found = []
        for stamp, line in self.lines:
            m = self.pattern.search(line)
            if m:
                found.append((stamp, int(m.group(1)), float(m.group(2))))
        return found


def run(job: Job, gpu: str, logs: Path) -> None:
    """Run ``job`` on ``gpu`` to its end, time-stamping each output line from the process start."""
    job.gpu = gpu
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(job.cmd, cwd=job.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    with open(logs / f"{job.name}.log", "w") as f:
        for line in proc.stdout:
            stamp = time.perf_counter() - t0
            job.lines.append((stamp, line.rstrip()))
            f.write(f"[{stamp:8.1f}] {line}")
    job.returncode = proc.wait()
    job.wall = time.perf_counter() - t0


def run_all(jobs: list[Job], gpus: list[str], logs: Path) -> None:
    """Each GPU runs one job at a time, taking the next waiting one when its job ends."""
    waiting: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        waiting.put(job)

    def worker(gpu: str) -> None:
        while True:
            try:
                job = waiting.get_nowait()
            except queue.Empty:
                return
            run(job, gpu, logs)

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def first_at_or_below(curve: list[tuple[float, int, float]], target: float) -> tuple[float, int] | None:
    return next(((s, step) for s, step, v in curve if v <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--nanogpt", type=Path, default=ROOT / ".peers" / "nanogpt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339], help="one run of ours per seed")
    parser.add_argument(
        "--experiment", default="shakespeare_char_muon", help="our recipe (shakespeare_char: the AdamW one)"
    )
    parser.add_argument("--gpus", nargs="+", default=["0"], help="GPU indices to spread the runs over")
    parser.add_argument("--logs", type=Path, default=Path(os.environ.get("OUT", "/tmp")), help="logs and the JSON")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/shakespeare_runs"), help="our run directories")
    parser.add_argument("--no-nanogpt", action="store_true", help="ours only; compare with --target")
    parser.add_argument("--target", type=float, default=None, help="the val loss to reach without a nanoGPT run")
    parser.add_argument("--bar", type=float, default=0.5, help="the share of nanoGPT's time each seed must beat")
    parser.add_argument("--no-prepare", action="store_true", help="let each of our runs prepare the data itself")
    parser.add_argument("override", nargs="*", help="extra overrides for our train.py")
    args = parser.parse_args()
    if args.no_nanogpt and args.target is None:
        parser.error("--no-nanogpt needs --target (e.g. nanoGPT's best, 1.4637)")

    args.logs.mkdir(parents=True, exist_ok=True)
    jobs: list[Job] = []
    if not args.no_nanogpt:
        data_dir = args.nanogpt / "data" / "shakespeare_char"
        shutil.copy(args.input, data_dir / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True, capture_output=True)
        theirs_cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py"]
        jobs.append(Job("nanogpt_shakespeare", theirs_cmd, args.nanogpt, THEIRS))
    data_overrides = [f"experiment={args.experiment}", f"data.paths=[{args.input.resolve()}]"]
    if not args.no_prepare:
        # nanoGPT's prepare.py runs before its timed run; ours tokenizes into data/ the same way (one
        # fast_dev_run step on the CPU), so that no seed's clock includes it and no two prepare at once.
        prepare = [sys.executable, str(ROOT / "train.py"), *data_overrides, "debug=fdr", "trainer=cpu"]
        prepare += ["module.compile=false", "callbacks=none", "sample.max_new_tokens=0", "resume=never"]
        prepare += [f"hydra.run.dir={args.runs / 'prepare'}", *args.override]
        subprocess.run(
            prepare, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, check=True, capture_output=True
        )
    for seed in args.seeds:
        run_dir = args.runs / f"ours_seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        ours_cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            *data_overrides,
            f"seed={seed}",
            "trainer.enable_progress_bar=false",
            "sample.max_new_tokens=0",
            "resume=never",
            f"hydra.run.dir={run_dir}",
            *args.override,
        ]
        jobs.append(Job(f"ours_seed{seed}", ours_cmd, ROOT, OURS))
    run_all(jobs, args.gpus, args.logs)

    theirs = None if args.no_nanogpt else jobs[0]
    ours = jobs[1:] if theirs else jobs
    failed = [j for j in jobs if j.returncode != 0 or not j.curve()]
    for job in failed:
        tail = "\n".join(line for _, line in job.lines[-30:])
        print(f"{job.name} failed (exit {job.returncode}) or printed no validation:\n{tail}")

    result: dict = {"gpus": args.gpus, "overrides": args.override, "bar": args.bar, "runs": {}}
    target = args.target
    their_at = None
    if theirs is not None and theirs.curve():
        curve = theirs.curve()
        target = min(v for _, _, v in curve)
        their_at = first_at_or_below(curve, target)
        assert their_at is not None
        print(
            f"nanoGPT (GPU {theirs.gpu}): best val {target:.4f}, first at step {their_at[1]} "
            f"after {their_at[0]:.1f} s; whole run {theirs.wall:.1f} s"
        )
    reached = within_bar = 0
    for job in ours:
        curve = job.curve()
        result["runs"][job.name] = {"gpu": job.gpu, "wall_s": job.wall, "curve": curve}
        if not curve:
            continue
        best = min(v for _, _, v in curve)
        best_s, best_step = first_at_or_below(curve, best) or (0.0, 0)
        line = f"{job.name} (GPU {job.gpu}): best {best:.4f} at step {best_step} after {best_s:.1f} s"
        at = first_at_or_below(curve, target) if target is not None else None
        if at is not None and target is not None:
            ratio = f" ({at[0] / their_at[0]:.2f}x nanoGPT's time)" if their_at else ""
            line += f"; reached {target:.4f} at step {at[1]} after {at[0]:.1f} s{ratio}"
            reached += their_at is None or at[0] < their_at[0]
            within_bar += their_at is not None and at[0] <= args.bar * their_at[0]
        elif target is not None:
            line += f"; never reached {target:.4f}"
        print(f"{line}; whole run {job.wall:.1f} s")
    if theirs is not None:
        result["runs"][theirs.name] = {"gpu": theirs.gpu, "wall_s": theirs.wall, "curve": theirs.curve()}
    if target is not None:
        print(
            f"{reached} of {len(ours)} seeds reached {target:.4f}" + (" in less time than nanoGPT" if their_at else "")
        )
        if their_at:
            print(f"{within_bar} of {len(ours)} seeds reached it in <= {args.bar}x nanoGPT's time")
    for job in jobs:
        print(job.name, " ".join(f"{step}:{v:.4f}@{s:.0f}s" for s, step, v in job.curve()))
    (args.logs / "shakespeare_vs_nanogpt.json").write_text(json.dumps(result, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
