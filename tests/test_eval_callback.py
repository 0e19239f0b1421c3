"""callbacks.lm_eval: lm-eval tasks on the live model during training, logged as eval/<task>/<metric>
at their step (the same numbers as evaluating the saved weights afterwards); training unchanged by
it (train mode and random state restored); bad values one `config error:` line."""

from __future__ import annotations

import csv
import inspect
import math
import subprocess
import sys

import pytest
import torch
from eval_helpers import PLAY, TASKS
from helpers import ROOT, compose_cfg, run_env
from omegaconf import OmegaConf

from mqa_lm.training.callbacks import LMEvalCallback
from mqa_lm.training.config import ConfigError
from mqa_lm.training.run import train

pytest.importorskip("lm_eval")

EVAL_TASKS = "[tiny_mc,tiny_gen,tiny_ppl]"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(PLAY * 20, encoding="utf-8")
    return path


def run_overrides(tmp_path, corpus, *extra):
    """A seconds-long CPU run of a BPE model whose context fits the tiny tasks."""
    return [
        "data=text",
        f"data.paths=[{corpus}]",
        "data.tokenizer=bpe",
        "data.vocab_size=300",
        "data.block_size=32",
        "data.batch_size=4",
        "data.val_batches=2",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.max_seq_len=64",
        "model.n_layers=2",
        "model.d_model=32",
        "model.heads=4",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.val_check_interval=3",
        "sample.max_new_tokens=0",
        *extra,
    ]


def lm_eval_overrides(every=3):
    return [
        f"callbacks.lm_eval.tasks={EVAL_TASKS}",
        f"callbacks.lm_eval.include_path={TASKS}",
        f"callbacks.lm_eval.every_n_steps={every}",
        "callbacks.lm_eval.batch_size=4",
    ]


def test_metrics_are_logged_at_their_step_and_match_the_saved_model(tmp_path, corpus):
    run = tmp_path / "run"
    overrides = run_overrides(
        tmp_path,
        corpus,
        "callbacks=[default,lm_eval]",
        *lm_eval_overrides(),
        "trainer.max_steps=6",
        "logger=csv",
        f"hydra.run.dir={run}",
    )
    done = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lm_eval at step 3: tiny_mc/acc" in done.stdout and "lm_eval at step 6:" in done.stdout

    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    logged = {
        int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("eval/") and v != ""}
        for r in rows
        if any(k.startswith("eval/") and v != "" for k, v in r.items())
    }
    assert sorted(logged) == [3, 6]
    names = {"eval/tiny_mc/acc", "eval/tiny_mc/acc_norm", "eval/tiny_gen/exact_match", "eval/tiny_ppl/word_perplexity"}
    assert names <= set(logged[6])
    assert logged[3]["eval/tiny_ppl/word_perplexity"] != logged[6]["eval/tiny_ppl/word_perplexity"]  # it trained

    # The step-6 numbers are those of the weights the run ended with, evaluated afterwards.
    from mqa_lm.evaluation.harness import MQALM
    from mqa_lm.evaluation.tasks import find_tasks, metrics, run_tasks
    from mqa_lm.pretrained.directory import load_pretrained

    model, tokenizer = load_pretrained(run / "checkpoints" / "last.ckpt")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    names_found, manager = find_tasks(["tiny_mc", "tiny_gen", "tiny_ppl"], [str(TASKS)])
    after = metrics(run_tasks(MQALM(model, tokenizer, batch_size=4), names_found, manager, bootstrap_iters=0))
    assert set(after) == set(logged[6])
    for name, value in after.items():
        assert math.isclose(logged[6][name], value, rel_tol=1e-5), name


def _weights(run):
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_training_is_the_same_with_and_without_the_callback(tmp_path, corpus):
    """Dropout on: a callback that left the model in eval mode, or the harness's seeding in the
    random state, would change every later step."""
    common = [
        "model.resid_pdrop=0.2",
        "model.emb_pdrop=0.2",
        "trainer.max_steps=6",
        "trainer.deterministic=true",
        "logger=csv",
    ]
    plain = tmp_path / "plain"
    train(
        compose_cfg(
            run_overrides(tmp_path, corpus, *common, "callbacks=[model_checkpoint]", f"paths.output_dir={plain}")
        )
    )
    evaluated = tmp_path / "evaluated"
    train(
        compose_cfg(
            run_overrides(
                tmp_path,
                corpus,
                *common,
                "callbacks=[model_checkpoint,lm_eval]",
                *lm_eval_overrides(every=2),
                "callbacks.lm_eval.limit=3",
                f"paths.output_dir={evaluated}",
            )
        )
    )
    evaluations = [r for r in csv.DictReader((evaluated / "csv" / "metrics.csv").open()) if r["eval/tiny_mc/acc"]]
    assert [int(r["step"]) for r in evaluations] == [2, 4, 6]  # it did run
    a, b = _weights(plain), _weights(evaluated)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tasks", "[]", "callbacks.lm_eval.tasks must name at least one task"),
        ("tasks", "[hellaswg]", r"callbacks.lm_eval.tasks: unknown task 'hellaswg' \(closest: hellaswag"),
        ("every_n_steps", "0", "callbacks.lm_eval.every_n_steps must be an integer >= 1, got 0"),
        ("limit", "0", "callbacks.lm_eval.limit must be null .*, got 0"),
        ("limit", "1.5", "callbacks.lm_eval.limit must be null .*, got 1.5"),
        ("num_fewshot", "-1", "callbacks.lm_eval.num_fewshot must be null .*, got -1"),
        ("batch_size", "0", "callbacks.lm_eval.batch_size must be an integer >= 1, got 0"),
        ("include_path", "/nonexistent/tasks", "callbacks.lm_eval.include_path: '/nonexistent/tasks' does not exist"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(tmp_path, corpus, key, value, message):
    overrides = [
        f"paths.output_dir={tmp_path / 'run'}",
        "callbacks=[lm_eval]",
        "callbacks.lm_eval.tasks=[tiny_mc]",
        f"callbacks.lm_eval.include_path={TASKS}",
        f"callbacks.lm_eval.{key}={value}",
    ]
    with pytest.raises(ConfigError, match=message):
        train(compose_cfg(run_overrides(tmp_path, corpus, *overrides)))
    assert not (tmp_path / "cache").exists()  # stopped before the data was prepared


def test_train_py_prints_one_config_error_line(tmp_path, corpus):
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            *run_overrides(tmp_path, corpus, "callbacks=[default,lm_eval]", "callbacks.lm_eval.limit=-1"),
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "config error: callbacks.lm_eval.limit must be null (every example), an integer >= 1 (examples per task) "
        "or a fraction in (0, 1), got -1"
    ]


def test_yaml_defaults_are_the_python_defaults():
    # The composed group: lm_eval.yaml over harness/_base (HarnessOptions), as train.py gets it.
    yaml = OmegaConf.to_container(compose_cfg(["callbacks=[lm_eval]"]).callbacks.lm_eval)
    parameters = inspect.signature(LMEvalCallback).parameters
    assert set(yaml) - {"_target_"} == set(parameters)
    for name, parameter in parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            assert yaml[name] == parameter.default, name
