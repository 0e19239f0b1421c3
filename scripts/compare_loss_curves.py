"""Compare the train-loss curves of runs logged by Lightning's CSVLogger.

    python scripts/compare_loss_curves.py outputs/torch/csv/metrics.csv outputs/triton/csv/metrics.csv \
        [more.csv ...] [--names torch triton ...] [--every 50]

The first file is the baseline. Prints the loss at every ``--every`` steps for each run, then, per
run, the mean and max |loss - baseline| over all common steps and over the last 100. Two correct
attention kernels in bf16 differ only by rounding noise; a third correct kernel (e.g. flash vs
torch) measures how large that noise is.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_curve(path: Path, key: str) -> dict[int, float]:
    curve: dict[int, float] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                curve[int(row["step"])] = float(row[key])
    if not curve:
        sys.exit(f"{path}: no '{key}' values with a 'step' column (is this a CSVLogger metrics.csv?)")
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--names", nargs="*")
    parser.add_argument("--key", default="train/loss")
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    if len(args.files) < 2:
        parser.error("give a baseline and at least one run to compare")
    names = args.names or [p.parent.parent.name for p in args.files]
    if len(names) != len(args.files):
        parser.error(f"--names has {len(names)} entries for {len(args.files)} files")
    curves = [read_curve(p, args.key) for p in args.files]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    print(f"{'step':>6} " + " ".join(f"{n:>10}" for n in names))
    shown = -1
    for s in steps:
        # The first logged step of each --every bucket (logged steps need not be multiples of it).
        if s // args.every != shown or s == steps[-1]:
            shown = s // args.every
            print(f"{s:>6} " + " ".join(f"{c[s]:>10.4f}" for c in curves))
    base = curves[0]
    tail = [s for s in steps if s > steps[-1] - 100]
    print(f"\n|{args.key} - {names[0]}| over {len(steps)} common steps (last 100 steps in brackets):")
    for name, curve in zip(names[1:], curves[1:]):
        diffs = [abs(curve[s] - base[s]) for s in steps]
        tail_diffs = [abs(curve[s] - base[s]) for s in tail]
        print(
            f"  {name:>10}: mean {sum(diffs) / len(diffs):.4f}  max {max(diffs):.4f}  "
            f"[mean {sum(tail_diffs) / len(tail_diffs):.4f}  max {max(tail_diffs):.4f}]"
        )


if __name__ == "__main__":
    main()
