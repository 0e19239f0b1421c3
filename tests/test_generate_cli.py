"""generate.py: sampling (one streamed prompt, a prompt file batched with left padding, several
samples) and mode=perplexity, against the library run directly; config errors before any work."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import repo_env
from hydra import compose, initialize_config_dir

from mqa_lm import MQAConfig, MQATransformer
from mqa_lm.data.tokenizer import build_char
from mqa_lm.inference import generate as lm_generate
from mqa_lm.pretrained.directory import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generate  # noqa: E402

TEXT = "It was the best of times, it was the worst of times; it was the age of wisdom.\n"


@pytest.fixture(autouse=True)
def _no_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def export(tmp_path):
    tokenizer = build_char([TEXT])
    torch.manual_seed(0)
    config = MQAConfig(
        vocab_size=tokenizer.get_vocab_size(),
        max_seq_len=64,
        n_layers=2,
        d_model=32,
        heads=4,
        kv_heads=1,
        attn_impl="torch",
        pos_emb="rope",
        init_std=0.3,
    )
    model = MQATransformer(config).eval()
    return save_pretrained(model, tmp_path / "export", tokenizer), model, tokenizer


def run_cli(capsys, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=list(overrides))
    generate.run(cfg)
    return capsys.readouterr()


def greedy_text(model, tokenizer, prompt, n):
    idx = torch.tensor([tokenizer.encode(prompt).ids])
    out = lm_generate(model, idx, n, temperature=0.0)
    return tokenizer.decode(out[0, idx.shape[1] :].tolist(), skip_special_tokens=False)


def test_one_prompt_streams_its_greedy_continuation(export, capsys):
    path, model, tokenizer = export
    out = run_cli(
        capsys,
        f"ckpt_path={path}",
        "prompt=it was the",
        "max_new_tokens=30",
        "temperature=0",
        "stop_at_eos=false",
        "device=cpu",
    )
    assert out.out == "it was the" + greedy_text(model, tokenizer, "it was the", 30) + "\n"
    assert "30 tokens" in out.err


def test_prompt_file_batches_prompts_and_samples(export, capsys, tmp_path):
    path, model, tokenizer = export
    prompts = ["it was the best", "wis", "the age of"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    out = run_cli(
        capsys,
        f"ckpt_path={path}",
        f"prompt_file={prompt_file}",
        "max_new_tokens=12",
        "temperature=0",
        "num_samples=2",
        "stop_at_eos=false",
        "device=cpu",
    ).out
    blocks = re.split(r"--- prompt (\d) sample (\d) ---\n", out)[1:]
    assert len(blocks) == 3 * 6  # 3 prompts x 2 samples, (prompt, sample, text) each
    for p, s, text in zip(blocks[0::3], blocks[1::3], blocks[2::3]):
        prompt = prompts[int(p)]
        assert text == prompt + greedy_text(model, tokenizer, prompt, 12) + "\n", (p, s)


def test_sampling_is_seeded(export, capsys):
    path, _, _ = export
    args = (
        f"ckpt_path={path}",
        "prompt=it",
        "max_new_tokens=20",
        "temperature=1.0",
        "top_k=10",
        "top_p=0.9",
        "num_samples=3",
        "device=cpu",
    )
    first = run_cli(capsys, *args, "seed=3").out
    assert run_cli(capsys, *args, "seed=3").out == first
    assert run_cli(capsys, *args, "seed=4").out != first


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ckpt_path=/nonexistent/run"], "ckpt_path='/nonexistent/run' does not exist"),
        (["ckpt_path=null"], r"ckpt_path is required: pass ckpt_path=<run directory"),
        (["mode=score"], "mode='score' is not one of: sample"),
        (["mode=perplexity"], "generate.py only samples; perplexity moved to eval.py: python eval.py mode=perplexity"),
        (["context_overflow=wrap"], "context_overflow must be one of slide, crop, error, got 'wrap'"),
        (["temperature=-1"], "temperature must be >= 0"),
        (["top_p=1.5"], r"top_p must be in \(0, 1\]"),
        (["num_samples=0"], "num_samples must be an integer >= 1"),
        (["prompt_file=/nonexistent.txt"], "prompt_file='/nonexistent.txt' is not a file"),
        (["attention=flash"], "attention='flash' is not one of"),
    ],
)
def test_bad_options_fail_before_loading(export, capsys, overrides, message):
    path, _, _ = export
    args = [f"ckpt_path={path}", *overrides] if not overrides[0].startswith("ckpt_path") else overrides
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=args)
    with pytest.raises(generate.UsageError, match=message):
        generate.run(cfg)


def test_context_overflow_error_past_the_window_is_a_config_error_before_generating(export, capsys):
    path, model, _ = export
    # prompt "it was" (6 tokens) + 59 new needs 64 = max_seq_len: fits; one more does not.
    fits = run_cli(
        capsys,
        f"ckpt_path={path}",
        "prompt=it was",
        "max_new_tokens=59",
        "context_overflow=error",
        "temperature=0",
        "stop_at_eos=false",
        "device=cpu",
    )
    assert fits.out.startswith("it was")
    with pytest.raises(generate.UsageError) as err:
        run_cli(
            capsys, f"ckpt_path={path}", "prompt=it was", "max_new_tokens=60", "context_overflow=error", "device=cpu"
        )
    assert str(err.value) == (
        "a prompt of 6 tokens + max_new_tokens=60 needs a window of 65 tokens, past the model's max_seq_len=64 "
        "(context_overflow=error); set max_new_tokens<=59, or context_overflow=slide or crop"
    )
    assert capsys.readouterr().out == ""  # nothing was generated


def test_command_line_entry_point(export):
    path, model, tokenizer = export
    env = repo_env()
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [
            sys.executable,
            "generate.py",
            f"ckpt_path={path}",
            # Typed as the shell passes it: the comma made it a Hydra sweep (an error) before.
            "prompt=the worst of times, it",
            "max_new_tokens=10",
            "temperature=0",
            "stop_at_eos=false",
            "device=cpu",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    prompt = "the worst of times, it"
    assert result.stdout == prompt + greedy_text(model, tokenizer, prompt, 10) + "\n"
    bad = subprocess.run(
        [sys.executable, "generate.py", "ckpt_path=/nonexistent"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "config error: ckpt_path='/nonexistent' does not exist" in bad.stderr


def _cli(*args, **kwargs):
    env = repo_env()
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(
        [sys.executable, "generate.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_ctrl_c_stops_at_once_keeps_the_text_and_exits_130(export):
    path, _, _ = export
    # Far past max_seq_len (64): slide keeps it going until interrupted.
    proc = _cli(f"ckpt_path={path}", "prompt=it was", "max_new_tokens=1000000", "device=cpu", "stop_at_eos=false")
    assert proc.stdout is not None
    printed = proc.stdout.read(40)  # the prompt and some generated text have arrived
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    assert (printed + out).startswith("it was") and len(printed + out) >= 40


def test_the_last_line_reports_load_first_token_and_decode_apart(export):
    path, _, _ = export
    proc = _cli(
        f"ckpt_path={path}", "prompt=it", "max_new_tokens=150", "temperature=0", "stop_at_eos=false", "device=cpu"
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    line = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"\(load [\d.]+ s \| prompt 2 tokens, first token [\d.]+ s \| (\d+) tokens, decode [\d,]+ tok/s "
        r"\| 1 rows on cpu, torch.float32\)",
        line,
    )
    assert match, line
    assert int(match.group(1)) == 150  # 150 > max_seq_len - 2: past the context, slide went on


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d, "holds no model"),  # an empty directory
        (lambda d: [(d / "model.safetensors").write_bytes(b"\x00" * 10), d][1], "no config.json"),
    ],
    ids=["empty_dir", "truncated_export"],
)
def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, make, message):
    target = make(tmp_path)
    proc = _cli(f"ckpt_path={target}", "prompt=x", "device=cpu")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_a_prompt_file_that_is_not_utf8_names_its_byte(export, tmp_path, capsys):
    path, _, _ = export
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"fine line\nbad \xff\xfe here\n")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[f"ckpt_path={path}", f"prompt_file={bad}"])
    with pytest.raises(generate.UsageError, match=r"prompt_file: .*prompts.txt: not UTF-8 at byte 14"):
        generate.run(cfg)
