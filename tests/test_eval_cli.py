"""eval.py: the same numbers as lm-eval's own command line with its HF backend on our transformers
export; results files that never replace an earlier one; perplexity mode; every bad input one
`config error:` line before any work; start-up without Lightning."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import PLAY, TASKS, tiny_lm
from helpers import ROOT, repo_env
from hydra import compose, initialize_config_dir

from mqa_lm.evaluation.perplexity import perplexity
from mqa_lm.pretrained.directory import save_pretrained

sys.path.insert(0, str(ROOT))
import eval as eval_py  # noqa: E402

pytest.importorskip("lm_eval")

TRAINING_STACK = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")
TASK_NAMES = "tiny_mc,tiny_gen,tiny_ppl"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)


@pytest.fixture
def export(tmp_path):
    """A copy of the tiny model's export: eval.py writes its results beside it."""
    return Path(shutil.copytree(tiny_lm().export, tmp_path / "model"))


def child_env():
    return repo_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TRITON_INTERPRET="0")


def run_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    eval_py.run(cfg)


def table_rows(text: str) -> dict[tuple[str, str, str], str]:
    """``(task, filter, metric) -> value`` of the harness's markdown table printed in ``text``."""
    rows, task = {}, ""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or cells[0] in ("Tasks", "Groups") or set(cells[0]) <= {"-", ":"} and cells[0]:
            continue
        task = cells[0] or task
        rows[(task, cells[2], cells[4])] = cells[6]
    return rows


def sample_scores(records):
    """``(task, doc_id) -> filtered responses`` with numbers as floats (the harness writes some as text)."""

    def plain(value):
        if isinstance(value, list):
            return [plain(v) for v in value]
        try:
            return float(value) if value not in ("True", "False") else value == "True"
        except (TypeError, ValueError):
            return value

    return {(r["task"], r["doc_id"]): plain(r["filtered_resps"]) for r in records}


@pytest.mark.slow
def test_same_table_and_scores_as_the_harness_hf_backend(tmp_path):
    tiny = tiny_lm()
    ours = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "eval.py",
            f"ckpt_path={tiny.export}",
            f"tasks=[{TASK_NAMES}]",
            f"include_path={TASKS}",
            "device=cpu",
            "dtype=fp32",
            "batch_size=4",
            "log_samples=true",
            f"output_path={tmp_path / 'ours'}",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in ours.stderr.splitlines() if "|" in line}
    assert {"torch", "lm_eval", "mqa_lm"} <= imported  # the import log was read
    assert imported & set(TRAINING_STACK) == set(), "eval.py must run without Lightning"
    theirs = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny.hf},dtype=float32",
            "--device",
            "cpu",
            "--tasks",
            TASK_NAMES,
            "--include_path",
            str(TASKS),
            "--batch_size",
            "4",
            "--log_samples",
            "--output_path",
            str(tmp_path / "hf"),
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert theirs.returncode == 0, theirs.stderr[-3000:]

    ours_table, their_table = table_rows(ours.stdout), table_rows(theirs.stdout)
    for metric in ("acc", "acc_norm", "exact_match", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert any(m == metric for _, _, m in ours_table), metric
    assert ours_table == their_table
    assert float(ours_table[("tiny_mc", "none", "acc")]) > 0.5  # far from chance (0.25): the test can fail
    assert 0 < float(ours_table[("tiny_gen", "none", "exact_match")]) < 1

    ours_samples = sample_scores(
        json.loads(line) for line in next((tmp_path / "ours").glob("*.samples.jsonl")).read_text().splitlines()
    )
    hf_records = []
    for path in (tmp_path / "hf").rglob("samples_*.jsonl"):
        task = re.match(r"samples_(.+)_\d{4}-", path.name).group(1)
        hf_records += [{"task": task, **json.loads(line)} for line in path.read_text().splitlines()]
    hf_samples = sample_scores(hf_records)
    assert ours_samples.keys() == hf_samples.keys() and len(ours_samples) == 12 + 8 + 3
    worst = 0.0
    for key, got in ours_samples.items():
        want = hf_samples[key]
        if key[0] == "tiny_gen":
            assert got == want, key  # the same greedy text, cut at the same stop sequence
            continue
        for g, w in zip(got, want):  # [log-likelihood, is_greedy] per choice, or a rolling log-likelihood
            g, w = (g, w) if isinstance(g, list) else ([g], [w])
            assert g[1:] == w[1:], key
            worst = max(worst, abs(g[0] - w[0]))
    assert worst < 1e-4, worst
    print(f"max |log-likelihood difference| over {len(ours_samples)} documents: {worst:.2e}")


def test_results_go_beside_the_checkpoint_and_are_never_replaced(export, capsys):
    args = (f"ckpt_path={export}", "tasks=[tiny_mc]", f"include_path={TASKS}", "device=cpu", "limit=4")
    run_eval(*args)
    run_eval(*args)  # the same second, most likely: a second name, not the first file replaced
    out = capsys.readouterr().out
    assert "tiny_mc" in out and "acc_norm" in out
    files = sorted(export.glob("eval-*.json"))
    assert len(files) == 2
    results = json.loads(files[0].read_text())
    assert (
        results["results"]["tiny_mc"]["acc,none"] == json.loads(files[1].read_text())["results"]["tiny_mc"]["acc,none"]
    )
    assert results["config"]["ckpt_path"] == str(export) and results["n-samples"]["tiny_mc"]["effective"] == 4

    named = export.parent / "mine.json"
    run_eval(*[a if a != "tasks=[tiny_mc]" else "tasks=tiny_mc" for a in args], f"output_path={named}")  # a string
    assert json.loads(named.read_text())["results"]["tiny_mc"]
    with pytest.raises(eval_py.UsageError, match="already exists and results are never overwritten"):
        run_eval(*args, f"output_path={named}")


def test_perplexity_mode_prints_and_records_the_library_numbers(export, tmp_path, capsys):
    text_file = tmp_path / "play.txt"
    text_file.write_text(PLAY * 2, encoding="utf-8")
    run_eval(
        "mode=perplexity",
        f"ckpt_path={export}",
        f"data.paths=[{text_file}]",
        "data.window=32",
        "data.stride=8",
        "device=cpu",
        f"output_path={tmp_path / 'out'}",
    )
    tiny = tiny_lm()
    want = perplexity(tiny.model, tiny.tokenizer, [PLAY * 2], window=32, stride=8)
    values = dict(re.findall(r"(\w+)=([\d.]+)", capsys.readouterr().out))
    assert int(values["tokens"]) == want.tokens and int(values["bytes"]) == len((PLAY * 2).encode())
    assert float(values["loss"]) == pytest.approx(want.loss, abs=1e-4)
    assert float(values["bits_per_byte"]) == pytest.approx(want.bits_per_byte, abs=1e-4)
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("eval-*.json")]
    assert record["window"] == 32 and record["stride"] == 8 and math.isclose(record["nll"], want.nll, rel_tol=1e-6)


@pytest.fixture
def bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("First Citizen: café au lait".encode("latin-1"))
    return {"empty": empty, "latin": latin}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tasks=[hellaswg]"], r"tasks: unknown task 'hellaswg' \(closest: hellaswag.*lm-eval ls tasks.*include_path="),
        (["tasks=[tiny_mc]", "include_path=/nonexistent/tasks"], "include_path: '/nonexistent/tasks' does not exist"),
        (["tasks=[tiny_mc]", "limit=0"], "limit must be null .*, got 0"),
        (["tasks=[tiny_mc]", "limit=-3"], "limit must be null .*, got -3"),
        (["tasks=[]"], "tasks must name at least one task"),
        (["tasks=[tiny_mc]", "num_fewshot=-1"], "num_fewshot must be null or an integer >= 0, got -1; null is each"),
        (["mode=perplexity"], r"mode=perplexity needs data.paths=\[file.txt,...\]"),
        (["mode=perplexity", "data.paths=[{empty}]"], "data.paths: .*empty.txt is empty"),
        (
            ["mode=perplexity", "data.paths=[{latin}]"],
            r"data.paths: .*latin1.txt: not UTF-8 at byte 18 \(invalid continuation byte\); convert it",
        ),
        (["mode=perplexity", "data.paths=[/nonexistent.txt]"], "data.paths entry '/nonexistent.txt' matches no file"),
        (["mode=perplexity", "data.paths=[{latin}]", "data.stride=0"], "data.stride must be null or an integer >= 1"),
        (["mode=score"], "mode='score' is not one of: tasks, perplexity"),
        (["device=tpu"], "device='tpu' is not one of"),
        (["batch_size=0"], "batch_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_input_is_one_clear_error_before_the_model_loads(export, bad_files, monkeypatch, overrides, message):
    def no_model(source):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(eval_py.ModelSource, "load", no_model)
    overrides = [o.format(**bad_files) for o in overrides]
    with pytest.raises(eval_py.UsageError, match=message):
        run_eval(f"ckpt_path={export}", f"include_path={TASKS}", *overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_a_gpu_is_a_config_error(export):
    with pytest.raises(eval_py.UsageError, match="device=cuda but CUDA is not available; use device=cpu"):
        run_eval(f"ckpt_path={export}", "tasks=[tiny_mc]", "device=cuda")


def test_checkpoint_problems_name_the_fix(tmp_path):
    tiny = tiny_lm()
    bare = save_pretrained(tiny.model, tmp_path / "no_tokenizer")  # no tokenizer.json
    with pytest.raises(eval_py.ModelLoadError, match="has no tokenizer.json; pass tokenizer_path="):
        run_eval(f"ckpt_path={bare}", "tasks=[tiny_mc]", f"include_path={TASKS}", "device=cpu")
    with pytest.raises(eval_py.UsageError, match=r"ckpt_path is required: pass ckpt_path=<run directory"):
        run_eval("tasks=[tiny_mc]")
    with pytest.raises(eval_py.UsageError, match="ckpt_path='/nonexistent/run' does not exist"):
        run_eval("ckpt_path=/nonexistent/run", "tasks=[tiny_mc]")
    # With the tokenizer given, the same directory evaluates.
    run_eval(
        f"ckpt_path={bare}",
        f"tokenizer_path={tiny.export / 'tokenizer.json'}",
        "tasks=[tiny_mc]",
        f"include_path={TASKS}",
        "device=cpu",
        "limit=2",
    )
    assert list(bare.glob("eval-*.json"))


def test_command_line_errors_are_one_line_and_exit_2(export):
    for args, message in (
        ([f"ckpt_path={export}", "tasks=[tiny_mc]", "limit=0"], "config error: limit must be null"),
        (["tasks=[tiny_mc]"], "config error: ckpt_path is required"),
        ([f"ckpt_path={export}", "nonexistent_key=1"], "config error: Could not override 'nonexistent_key'"),
    ):
        done = subprocess.run(
            [sys.executable, "eval.py", *args], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not list(export.glob("eval-*.json"))


def test_config_defaults_are_the_library_defaults():

    from mqa_lm.evaluation.scoring import BATCH_SIZE

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval")
    assert cfg.batch_size == BATCH_SIZE  # harness/_base, from HarnessOptions
    assert (cfg.device, cfg.dtype, cfg.ckpt_path) == ("auto", "auto", None)  # model_source/_base, from ModelSource
    assert cfg.data.window is None and cfg.data.stride is None  # perplexity()'s own defaults


def test_bench_eval_smoke_run(tmp_path):
    """scripts/bench_eval.py on a CPU: a tiny model, both backends, the same scores."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "scripts/bench_eval.py", "--device", "cpu", "--quick", "--repeats", "1", "--json", str(out)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ours / hf requests per second" in done.stdout
    row = json.loads(out.read_text())
    assert row["requests"] == 40 and row["ours_requests_per_s"] > 0 and row["hf_requests_per_s"] > 0
    assert row["max_loglik_gap"] < 1e-4
    assert (row["ours_acc"], row["ours_acc_norm"]) == (row["hf_acc"], row["hf_acc_norm"])


def test_rolling_tasks_use_the_perplexity_windows(export):
    """data.window / data.stride set the windows of a loglikelihood_rolling task: each document's
    log-likelihood is then our perplexity's, for the same window and stride."""
    run_eval(
        f"ckpt_path={export}",
        "tasks=[tiny_ppl]",
        f"include_path={TASKS}",
        "device=cpu",
        "data.window=48",
        "data.stride=16",
        "log_samples=true",
    )
    (results_file,) = export.glob("eval-*.json")
    assert json.loads(results_file.read_text())["config"]["rolling_stride"] == 16
    tiny = tiny_lm()
    records = [json.loads(line) for line in results_file.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        (loglikelihood,) = record["filtered_resps"]
        want = perplexity(tiny.model, tiny.tokenizer, [record["doc"]["text"]], window=48, stride=16).nll
        assert math.isclose(-loglikelihood, want, rel_tol=1e-6)
    with pytest.raises(
        eval_py.UsageError, match=r"data.window must be an integer in \[2, 64\], got 65; the model's max_seq_len is 64"
    ):
        run_eval(f"ckpt_path={export}", "tasks=[tiny_ppl]", f"include_path={TASKS}", "device=cpu", "data.window=65")
