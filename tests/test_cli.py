"""The command lines' own failures: a run directory that cannot be made, a config file that does not parse.

Each is one line on stderr naming the value and the fix, exit status 2, before any work
(mqa_lm.cli.main, used by train.py); the helpers are also checked in this process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CORPUS, ROOT, run_env, tiny_run

from mqa_lm.cli.main import check_hydra_command, config_file_error
from mqa_lm.utils.files import dir_write_problem


def train_py(tmp_path: Path, *extra: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python train.py [options]`` on a tiny corpus (in ``tmp_path``), stopped after one step if it
    ever trains (Hydra's options come before the overrides)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *options,
        "data=text",
        f"data.paths=[{corpus}]",
        *tiny_run(tmp_path / "cache", n_layers=1),
        "trainer.max_steps=1",
        "sample.max_new_tokens=0",
        *extra,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=240)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The only line the process wrote to stderr (and the test fails showing all of it otherwise)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def test_run_dir_under_a_file_is_one_line_and_the_file_is_untouched(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("my notes\n", encoding="utf-8")
    done = train_py(tmp_path, f"hydra.run.dir={blocker}/run")
    line = one_line(done)
    assert line == (
        f"config error: hydra.run.dir={blocker}/run cannot be created: {blocker} is a file, not a directory; "
        "choose another hydra.run.dir"
    )
    assert blocker.read_text(encoding="utf-8") == "my notes\n"
    assert not (tmp_path / "cache").exists()  # stopped before the data


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs mounted ro; needs root), skipped where mounting is not allowed."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_run_dir_on_a_read_only_file_system_is_one_line(tmp_path, read_only_dir):
    target = read_only_dir / "outputs" / "run"
    line = one_line(train_py(tmp_path, f"hydra.run.dir={target}"))
    assert line == (
        f"config error: hydra.run.dir={target} cannot be created: {read_only_dir} is on a read-only file system; "
        "choose another hydra.run.dir"
    )


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    configs = tmp_path / "conf"
    (configs / "experiment").mkdir(parents=True)
    bad = configs / "experiment" / "bad.yaml"
    bad.write_text("# @package _global_\nmodel:\n  d_model: [64\n  heads: 4\n", encoding="utf-8")
    line = one_line(train_py(tmp_path, "+experiment=bad", options=("--config-dir", str(configs))))
    assert line == (
        f"config error: {bad}:4:8: expected ',' or ']', but got ':' (while parsing a flow sequence at line 3, "
        "column 12); fix the YAML syntax of that file"
    )
    assert not list(tmp_path.glob("outputs/*/*"))


def test_dir_write_problem_says_what_is_in_the_way(tmp_path):
    assert dir_write_problem(tmp_path / "new" / "deeper") is None  # missing parents are created by Hydra
    assert dir_write_problem(tmp_path) is None
    (tmp_path / "f").write_text("x", encoding="utf-8")
    assert dir_write_problem(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a directory"
    assert dir_write_problem(tmp_path / "f" / "a" / "b") == f"{tmp_path / 'f'} is a file, not a directory"
    assert not (tmp_path / "new").exists()  # a check creates nothing


def test_config_file_error_reads_yaml_marks(tmp_path):
    import yaml

    path = tmp_path / "x.yaml"
    path.write_text("a: 1\nb: : 2\n", encoding="utf-8")
    with pytest.raises(yaml.YAMLError) as err, open(path, encoding="utf-8") as f:
        yaml.safe_load(f)
    message = config_file_error(err.value)
    assert message is not None and message.startswith(f"{path}:2:4: ")
    assert config_file_error(ValueError("not yaml")) is None


def _task(cfg) -> None:
    """A stand-in task function for check_hydra_command (only its location matters to Hydra)."""


def test_check_hydra_command_in_process(tmp_path):
    from helpers import CONFIGS
    from hydra.core.global_hydra import GlobalHydra

    assert check_hydra_command(_task, str(CONFIGS), "train", [f"hydra.run.dir={tmp_path}/run"]) is None
    assert not GlobalHydra.instance().is_initialized()  # left as found, for hydra.main to initialise
    assert not (tmp_path / "run").exists()

    message = check_hydra_command(_task, str(CONFIGS), "train", ["model=nonexistent"])
    assert message is not None and "\n" not in message
    assert message.startswith("In 'train': Could not find 'model/nonexistent'; Available options in 'model': ")
    assert "tiny" in message.split("Available options in 'model': ")[1].split(", ")

    (tmp_path / "f").write_text("x", encoding="utf-8")
    assert check_hydra_command(_task, str(CONFIGS), "train", [f"hydra.run.dir={tmp_path}/f/run"]) == (
        f"hydra.run.dir={tmp_path}/f/run cannot be created: {tmp_path}/f is a file, not a directory; "
        "choose another hydra.run.dir"
    )
    assert check_hydra_command(_task, str(CONFIGS), "train", ["--cfg", "job", "model=nonexistent"]) is None


def test_check_hydra_command_checks_the_directory_of_the_run_mode(tmp_path):
    """The mode comes from --multirun or the config's hydra.mode, as Hydra decides it; the check
    composes once when they agree, and again as Hydra does when the config says otherwise."""
    from helpers import CONFIGS

    (tmp_path / "f").write_text("x", encoding="utf-8")
    run, sweep = f"hydra.run.dir={tmp_path}/f/run", f"hydra.sweep.dir={tmp_path}/f/sweep"

    def check(*argv: str) -> str | None:
        return check_hydra_command(_task, str(CONFIGS), "train", list(argv))

    for argv in ([sweep], ["--multirun", run], ["hydra.mode=MULTIRUN", run]):
        assert check(*argv) is None, argv  # the other mode's directory is never created
    for argv in (["--multirun", sweep], ["hydra.mode=MULTIRUN", sweep], ["hydra.mode=MULTIRUN", "optim.lr=1,2", sweep]):
        assert (
            check(*argv)
            == f"{sweep} cannot be created: {tmp_path}/f is a file, not a directory; choose another hydra.sweep.dir"
        )
    assert check(run).startswith(f"{run} cannot be created")
    assert check("optim.lr=1,2").startswith("Ambiguous value for argument 'optim.lr=1,2'")
    assert check("hydra.mode=BAD").startswith("Error merging override hydra.mode=BAD")


def test_hydra_main_hands_the_checked_config_to_on_config(tmp_path, monkeypatch):
    """on_config gets the config of a command that passed the check, before the task runs with
    Hydra's own composition; a command that fails the check stops before either."""
    from helpers import CONFIGS

    from mqa_lm.cli.main import hydra_main

    calls = []
    entry = hydra_main(str(CONFIGS), "train", on_config=lambda cfg: calls.append(("on_config", cfg.seed)))(
        lambda cfg: calls.append(("task", cfg.seed))
    )
    monkeypatch.setattr(sys, "argv", ["train.py", f"hydra.run.dir={tmp_path}/run", "seed=7"])
    entry()
    assert calls == [("on_config", 7), ("task", 7)]
    monkeypatch.setattr(sys, "argv", ["train.py", f"hydra.run.dir={tmp_path}/run2", "model=nonexistent"])
    with pytest.raises(SystemExit) as exit_:
        entry()
    assert exit_.value.code == 2 and calls == [("on_config", 7), ("task", 7)]


PROMPTS = [
    "def main(",  # Hydra's grammar refused it
    "Hello, world",  # a sweep
    "[1, 2]",  # a list
    "{a: 1}",  # a dict
    "42",  # an int
    "true",  # a bool
    "  padded  ",  # stripped
    "it's",
    "a 'quoted' word",
    "back\\slash",
    "ends in a backslash\\",
    "\\'",
    "a\\\\b",
    "x=1",
    "café ✓",
    "ROMEO:",  # already a string as typed
    "",
]


@pytest.mark.parametrize("text", PROMPTS)
def test_a_prompt_reaches_the_config_as_typed(text):
    """The value Hydra composes for a free-text key is the text the shell passed, whatever Hydra's
    grammar would have made of it; other keys are left to Hydra."""
    from hydra import compose, initialize_config_dir

    from mqa_lm.cli import config_store
    from mqa_lm.cli.main import quote_free_text

    config_store.register("generation", "model_source")  # what generate.yaml composes

    argv = quote_free_text([f"prompt={text}", "max_new_tokens=5", "top_k=[1]"], {"prompt"})
    assert argv[1:] == ["max_new_tokens=5", "top_k=[1]"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=argv[:2])
    assert cfg.prompt == text


@pytest.mark.parametrize(
    "arg,value", [('prompt="def main("', "def main("), ("prompt='a, b'", "a, b"), ("prompt=null", None)]
)
def test_a_prompt_already_in_hydras_terms_keeps_them(arg, value):
    """Quoted for Hydra (the shell passed ``'prompt="def main("'``), or ``null``: left as they were."""
    from hydra import compose, initialize_config_dir

    from mqa_lm.cli import config_store
    from mqa_lm.cli.main import quote_free_text

    config_store.register("generation", "model_source")  # what generate.yaml composes

    assert quote_free_text([arg], {"prompt"}) == [arg]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[arg])
    assert cfg.prompt == value
