"""Time to quality on shakespeare_char: ours (``experiment=shakespeare_char``) beside nanoGPT's
``train.py config/train_shakespeare_char.py``, started together, one GPU each (or one after the
other with ``--sequential``). Every output line of both is time-stamped from its process start.

    python scripts/shakespeare_vs_nanogpt.py --input path/to/input.txt --nanogpt .peers/nanogpt

Reports nanoGPT's best val loss and when it first reached it, and when ours first reached that
loss (and its own best). The nanoGPT checkout is the user's (a git-ignored folder); its
``data/shakespeare_char/prepare.py`` reads ``input.txt`` placed beside it, so no download runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEIRS = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")
OURS = re.compile(r"step (\d+): val/loss ([\d.]+)")


def start(cmd: list[str], cwd: Path, gpu: str, log: Path) -> tuple[subprocess.Popen, list, float]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        with open(log, "w") as f:
            for line in proc.stdout:
                stamp = time.perf_counter() - t0
                lines.append((stamp, line.rstrip()))
                f.write(f"[{stamp:8.1f}] {line}")

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    proc.thread = thread  # type: ignore[attr-defined]
    return proc, lines, t0


def finish(proc: subprocess.Popen, t0: float) -> float:
    proc.wait()
    proc.thread.join()  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def curve(lines: list[tuple[float, str]], pattern: re.Pattern) -> list[tuple[float, int, float]]:
    found = []
    for stamp, line in lines:
        m = pattern.search(line)
        if m:
            found.append((stamp, int(m.group(1)), float(m.group(2))))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--nanogpt", type=Path, default=ROOT / ".peers" / "nanogpt")
    parser.add_argument("--sequential", action="store_true", help="one GPU: run nanoGPT, then ours")
    parser.add_argument("--logs", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    parser.add_argument("override", nargs="*", help="extra overrides for our train.py")
    args = parser.parse_args()

    data_dir = args.nanogpt / "data" / "shakespeare_char"
    shutil.copy(args.input, data_dir / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True, capture_output=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    theirs_cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py"]
    ours_cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=shakespeare_char",
        f"data.paths=[{args.input.resolve()}]",
        "trainer.enable_progress_bar=false",
        "hydra.run.dir=/tmp/shakespeare_ours",
        *args.override,
    ]

    if args.sequential:
        p, theirs, t = start(theirs_cmd, args.nanogpt, "0", args.logs / "nanogpt_shakespeare.log")
        theirs_wall = finish(p, t)
        p, ours, t = start(ours_cmd, ROOT, "0", args.logs / "ours_shakespeare.log")
        ours_wall = finish(p, t)
    else:
        p1, theirs, t1 = start(theirs_cmd, args.nanogpt, "1", args.logs / "nanogpt_shakespeare.log")
        p2, ours, t2 = start(ours_cmd, ROOT, "0", args.logs / "ours_shakespeare.log")
        theirs_wall, ours_wall = finish(p1, t1), finish(p2, t2)

    their_curve, our_curve = curve(theirs, THEIRS), curve(ours, OURS)
    result = {"nanogpt_wall_s": theirs_wall, "ours_wall_s": ours_wall, "nanogpt": their_curve, "ours": our_curve}
    (args.logs / "shakespeare_vs_nanogpt.json").write_text(json.dumps(result, indent=1))
    if not their_curve or not our_curve:
        print("a run printed no validation:", "\n".join(line for _, line in (theirs + ours)[-40:]))
        sys.exit(1)
    best = min(v for _, _, v in their_curve)
    their_at = next((s, step) for s, step, v in their_curve if v <= best)
    our_best = min(v for _, _, v in our_curve)
    our_at = next(((s, step) for s, step, v in our_curve if v <= best), None)
    print(
        f"nanoGPT: best val {best:.4f}, first at step {their_at[1]} after {their_at[0]:.1f} s; "
        f"whole run {theirs_wall:.1f} s"
    )
    if our_at:
        print(
            f"ours:    reached {best:.4f} at step {our_at[1]} after {our_at[0]:.1f} s "
            f"({our_at[0] / their_at[0]:.2f}x nanoGPT's time); best {our_best:.4f}; whole run {ours_wall:.1f} s"
        )
    else:
        print(f"ours:    never reached {best:.4f}; best {our_best:.4f}; whole run {ours_wall:.1f} s")
    for name, c in (("nanoGPT", their_curve), ("ours", our_curve)):
        print(name, " ".join(f"{step}:{v:.4f}@{s:.0f}s" for s, step, v in c))


if __name__ == "__main__":
    main()
