"""Time ``generate.py`` as users run it: whole processes, on a model of the shakespeare_char shape.

Builds (once) an export of ``experiment=shakespeare_char``'s model (6 layers, 384 wide, 6 heads, MQA,
max_seq_len 256, a character tokenizer; random weights: speed does not depend on them), then runs each
command (the rows of issue 26's table) ``--repeats`` times as a fresh process and reports its wall
time and what generate.py printed on its last line (load, first token, decode tok/s), beside the
cost of starting torch alone: ``python -c "import torch; torch.zeros(1, device='cuda')"`` on a GPU,
``import torch, tokenizers`` on CPU. It prints how long the table took (72 s on a 2-core CPU without
the compile rows).

    python scripts/bench_generate_cli.py                 # on the GPU if there is one
    python scripts/bench_generate_cli.py --device cpu --json out.json
"""

from __future__ import annotations

import argparse
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

LAST_LINE = re.compile(
    r"\(load (?P<load>[\d.]+) s \| prompt (?P<prompt>\d+) tokens, first token (?P<ttft>[\d.]+) s \| "
    r"(?P<tokens>\d+) tokens, decode (?P<rate>[\d,]+ tok/s|-)"
)
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def build_export(directory: Path) -> Path:
    import torch

    from mqa_lm import MQAConfig, MQATransformer, save_pretrained
    from mqa_lm.data.tokenizer import build_char

    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else "ROMEO: to be or not to be\n" * 50
    tokenizer = build_char([text])
    config = MQAConfig(
        vocab_size=tokenizer.get_vocab_size(),
        max_seq_len=256,
        n_layers=6,
        d_model=384,
        heads=6,
        kv_heads=1,
        bias=False,
        norm_type="layernorm",
        mlp_hidden=1856,
    )
    torch.manual_seed(0)
    return save_pretrained(MQATransformer(config), directory, tokenizer)


def timed(command: list[str], env: dict[str, str], prompt_file: Path | None = None) -> dict:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    row: dict = {"seconds": seconds, "rc": done.returncode}
    match = LAST_LINE.search(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")
    if match:
        row.update({k: v for k, v in match.groupdict().items()})
    elif done.returncode:
        row["error"] = done.stderr[-500:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per command (the median is shown)")
    parser.add_argument("--workdir", default=None, help="where the export goes (default: a temp dir)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the two compile=true processes (slow on CPU)"
    )
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-cli-"))
    export = work / "shakespeare-shape"
    if not (export / "model.safetensors").is_file():
        build_export(export)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(f"ROMEO {i}:" for i in range(16)) + "\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    gen = [sys.executable, "generate.py", f"ckpt_path={export}", f"device={device}", "stop_at_eos=false"]
    base = "import torch; torch.zeros(1, device='cuda')" if device == "cuda" else "import torch, tokenizers"
    greedy = ["prompt=ROMEO:", "temperature=0"]
    # The table, in its order: the first sampled process is the machine's first generate.py
    # run when the script starts on a fresh machine; the second compile=true process finds the first's
    # compilation in Inductor's on-disk caches.
    commands = {
        f"python -c {base!r}": [sys.executable, "-c", base],
        "max_new_tokens=1": gen + ["prompt=ROMEO:", "max_new_tokens=1"],
        "200 sampled (defaults), first": gen + ["prompt=ROMEO:", "max_new_tokens=200"],
        "200 sampled (defaults), again": gen + ["prompt=ROMEO:", "max_new_tokens=200"],
        "200 greedy": gen + greedy + ["max_new_tokens=200"],
        "1000 greedy (past max_seq_len, slide)": gen + greedy + ["max_new_tokens=1000"],
        "1000 greedy, context_overflow=crop": gen + greedy + ["max_new_tokens=1000", "context_overflow=crop"],
        "16 prompts x 200": gen + [f"prompt_file={prompts}", "max_new_tokens=200"],
    }
    if args.compile:
        commands["200 greedy, compile=true, first"] = gen + greedy + ["max_new_tokens=200", "compile=true"]
        commands["200 greedy, compile=true, again"] = gen + greedy + ["max_new_tokens=200", "compile=true"]
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    base_wall = 0.0
    header = ("wall s", "- base", "load s", "first s", "tokens", "decode")
    print(f"{'command':40s} " + " ".join(f"{h:>{w}s}" for h, w in zip(header, (7, 7, 7, 8, 7, 14))))
    for name, command in commands.items():
        runs = [timed(command, env) for _ in range(args.repeats)]
        results[name] = runs
        wall = statistics.median(r["seconds"] for r in runs)
        base_wall = base_wall or wall  # the first command is the torch-alone baseline
        last = runs[-1]
        print(
            f"{name:40s} {wall:7.2f} {wall - base_wall:7.2f} {last.get('load', '-'):>7s} {last.get('ttft', '-'):>8s} "
            f"{last.get('tokens', '-'):>7s} {last.get('rate', '-'):>14s}"
            + (f"  rc {last['rc']} ERROR {last['error']}" if last["rc"] or "error" in last else ""),
            flush=True,
        )
    one = statistics.median(r["seconds"] for r in results["max_new_tokens=1"])
    print(f"generate.py max_new_tokens=1 / python -c {base!r}: {one / base_wall:.2f}x")
    print(f"({time.perf_counter() - started:.0f} s for the table, {device})")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
