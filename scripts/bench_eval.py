"""Benchmark evaluation: our lm-eval model against lm-eval's HF backend on our export, one GPU.

Builds the GPT-2-small shape of configs/model/gpt2_small.yaml (12 layers, d 768, 12 query heads,
1 K/V head, vocab 50304, max_seq_len 1024) with random weights and a BPE tokenizer trained on the
Python standard library's source, saves it (ours) and exports it (transformers GPTBigCode), writes a
local multiple-choice task of ``--questions`` questions x 4 choices (contexts of 100-300 tokens,
choices of 5-30, spans of the same source) and times the harness's ``simple_evaluate`` on it, as
``eval.py`` runs it, through :class:`mqa_lm.evaluation.harness.MQALM` and through lm-eval's
``HFLM``: same task, same batch size, same dtype (bf16 on the GPU), one warm-up run each first.
Prints requests/s of both and their ratio, the accuracies and the largest log-likelihood gap.

    python scripts/bench_eval.py                          # 1,000 requests, batch 32, bf16 on cuda
    python scripts/bench_eval.py --batch-size 64 --json bench_eval.json
    python scripts/bench_eval.py --device cpu --quick     # smoke run: a tiny fp32 model, 40 requests
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqa_lm import MQAConfig, MQATransformer  # noqa: E402
from mqa_lm.data.tokenizer import train_bpe  # noqa: E402
from mqa_lm.pretrained.directory import load_pretrained, save_pretrained  # noqa: E402
from mqa_lm.pretrained.hf import export_hf  # noqa: E402
from mqa_lm.pretrained.placement import resolve_device  # noqa: E402

TASK = "bench_mc"
SHAPES = {
    # GPT-2 small (the MQAConfig defaults): what the numbers are for.
    "full": {"n_layers": 12, "d_model": 768, "heads": 12, "vocab_size": 50304, "max_seq_len": 1024},
    # --quick: a smoke run that finishes in seconds on a CPU.
    "quick": {"n_layers": 2, "d_model": 64, "heads": 4, "vocab_size": 512, "max_seq_len": 256},
}


def source_text(max_chars: int) -> str:
    """Python standard library source, file by file in a fixed order, up to ``max_chars``."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(chunks)[:max_chars]


def write_task(directory: Path, tokenizer, text: str, questions: int, context: tuple[int, int], seed: int) -> Path:
    """A multiple-choice task (YAML + JSON lines) whose contexts and choices are token spans of ``text``."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    rng = random.Random(seed)
    with open(directory / f"{TASK}.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(questions):
            length = rng.randint(*context)
            start = rng.randrange(0, len(ids) - length - 64)
            question = tokenizer.decode(ids[start : start + length])
            choices = []
            for _ in range(4):
                at = rng.randrange(0, len(ids) - 32)
                choices.append(tokenizer.decode(ids[at : at + rng.randint(5, 30)]).strip() or "pass")
            fh.write(json.dumps({"question": question, "choices": choices, "answer": rng.randrange(4)}) + "\n")
    yaml = directory / f"{TASK}.yaml"
    yaml.write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / f'{TASK}.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return yaml


class Timed:
    """An lm-eval model whose ``loglikelihood`` calls are timed, evaluated on the bench task."""

    def __init__(self, lm, manager, device: torch.device) -> None:
        self.lm, self.manager, self.device = lm, manager, device
        self.model_seconds = 0.0
        scored = lm.loglikelihood

        def loglikelihood(requests, *args, **kwargs):
            start = time.perf_counter()
            out = scored(requests, *args, **kwargs)
            self._sync()
            self.model_seconds += time.perf_counter() - start
            return out

        lm.loglikelihood = loglikelihood  # the instance attribute shadows the method: the harness calls this

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate(self, limit: int | None = None) -> tuple[float, float, dict]:
        """``(seconds, seconds in loglikelihood, results)`` of one ``simple_evaluate`` of the task."""
        from lm_eval import simple_evaluate

        self._sync()
        self.model_seconds = 0.0
        start = time.perf_counter()
        results = simple_evaluate(
            model=self.lm, tasks=[TASK], task_manager=self.manager, limit=limit, bootstrap_iters=0, log_samples=True
        )
        self._sync()
        return time.perf_counter() - start, self.model_seconds, results


def logliks(results: dict) -> list[float]:
    return [float(r[0]) for sample in results["samples"][TASK] for r in sample["filtered_resps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny model and 10 questions (CPU smoke run)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward, both backends")
    parser.add_argument("--questions", type=int, default=None, help="4 requests each (default 250; quick: 10)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, else fp32")
    parser.add_argument("--repeats", type=int, default=2, help="full runs of each backend; the fastest counts")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mqa_lm.evaluation.harness import MQALM

    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    shape = SHAPES["quick" if args.quick else "full"]
    questions = args.questions or (10 if args.quick else 250)
    context = (30, 60) if args.quick else (100, 300)

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    start = time.perf_counter()
    text = source_text(300_000 if args.quick else 4_000_000)
    tokenizer = train_bpe([text], vocab_size=300 if args.quick else 8192)
    torch.manual_seed(0)
    model = MQATransformer(MQAConfig(kv_heads=1, pos_emb="learned", **shape)).eval()
    save_pretrained(model, work / "ours", tokenizer)
    export_hf(model, work / "hf", tokenizer)
    del model
    write_task(work, tokenizer, text, questions, context, seed=0)
    manager = TaskManager(include_path=str(work), include_defaults=False)
    print(f"setup: {time.perf_counter() - start:.1f} s in {work}", file=sys.stderr)

    ours_model, ours_tokenizer = load_pretrained(work / "ours", device=device, dtype=dtype)
    ours = Timed(MQALM(ours_model, ours_tokenizer, batch_size=args.batch_size, progress=False), manager, device)
    hf = Timed(
        HFLM(
            pretrained=str(work / "hf"),
            device=str(device),
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
            batch_size=args.batch_size,
        ),
        manager,
        device,
    )
    # Warm both up first (kernel selection, lazy imports, the harness's first-call work), then take
    # the best of --repeats full runs of each, alternating.
    for backend in (ours, hf):
        backend.evaluate(limit=max(1, questions // 10))
    runs: dict[str, list] = {"ours": [], "hf": []}
    for _ in range(args.repeats):
        for name, backend in (("ours", ours), ("hf", hf)):
            runs[name].append(backend.evaluate())
    ours_seconds, ours_model_seconds, ours_results = min(runs["ours"], key=lambda r: r[0])
    hf_seconds, hf_model_seconds, hf_results = min(runs["hf"], key=lambda r: r[0])

    requests = 4 * questions
    ours_scores, hf_scores = logliks(ours_results), logliks(hf_results)
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name,
        "shape": shape,
        "batch_size": args.batch_size,
        "requests": requests,
        "ours_seconds": ours_seconds,
        "hf_seconds": hf_seconds,
        "ours_requests_per_s": requests / ours_seconds,
        "hf_requests_per_s": requests / hf_seconds,
        "speedup": hf_seconds / ours_seconds,
        "ours_model_seconds": ours_model_seconds,
        "hf_model_seconds": hf_model_seconds,
        "ours_model_requests_per_s": requests / ours_model_seconds,
        "hf_model_requests_per_s": requests / hf_model_seconds,
        "model_speedup": hf_model_seconds / ours_model_seconds,
        "ours_acc": ours_results["results"][TASK]["acc,none"],
        "hf_acc": hf_results["results"][TASK]["acc,none"],
        "ours_acc_norm": ours_results["results"][TASK]["acc_norm,none"],
        "hf_acc_norm": hf_results["results"][TASK]["acc_norm,none"],
        "max_loglik_gap": max(abs(a - b) for a, b in zip(ours_scores, hf_scores)),
    }
    print(f"{row['device']}, {dtype_name}, batch {args.batch_size}, {requests} loglikelihood requests")
    print(f"{'backend':<20}{'seconds':>9}{'requests/s':>12}{'model s':>9}{'model req/s':>13}{'acc':>7}{'acc_norm':>9}")
    for name, key in (("mqa_lm (MQALM)", "ours"), ("lm-eval hf (HFLM)", "hf")):
        print(
            f"{name:<20}{row[f'{key}_seconds']:>9.2f}{row[f'{key}_requests_per_s']:>12.1f}"
            f"{row[f'{key}_model_seconds']:>9.2f}{row[f'{key}_model_requests_per_s']:>13.1f}"
            f"{row[f'{key}_acc']:>7.3f}{row[f'{key}_acc_norm']:>9.3f}"
        )
    print(
        f"ours / hf requests per second: {row['speedup']:.2f}x end to end, {row['model_speedup']:.2f}x in the "
        f"model's loglikelihood call; max |log-likelihood gap| {row['max_loglik_gap']:.3g}"
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
