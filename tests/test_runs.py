"""Runs as processes: one directory per run and one live run per directory, Ctrl-C, a full disk."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, ROOT, run_env, tiny_run

from mqa_lm.training.run_dir import LOCK_NAME, RunDirLock


def tiny(base: Path, *extra: str) -> list[str]:
    """A seconds-long CPU run of train.py (the corpus and its cache are shared by a test's runs)."""
    corpus = base / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(CORPUS, encoding="utf-8")
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "data=text",
        f"data.paths=[{corpus}]",
        *tiny_run(base / "cache", n_layers=1),
        "sample.max_new_tokens=0",
        *extra,
    ]


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    cmd = tiny(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv", "callbacks=none")
    subprocess.run(cmd + ["trainer.max_steps=1"], cwd=tmp_path, env=run_env(), capture_output=True, timeout=240)
    for p in run_dirs(tmp_path):  # the data cache is ready; start the two runs together
        subprocess.run(["rm", "-rf", str(p)], check=True)
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2, dirs
    for d in dirs:
        assert (d / "csv" / "metrics.csv").is_file() and not (d / LOCK_NAME).exists()  # released at exit


def test_a_live_run_directory_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mqa_lm.training.run_dir import RunDirLock; "
            f"RunDirLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(120)",
        ],
        env=run_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = subprocess.run(
            tiny(tmp_path, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"),
            cwd=tmp_path,
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert lines == [
            f"error: run directory {run_dir} is in use by another run (pid {holder.pid} on host "
            f"{os.uname().nodename}, since {lines[0].split('since ')[1].split(')')[0]}); wait for it to "
            f"finish or choose another hydra.run.dir (if no run is using it, delete {run_dir / LOCK_NAME})"
        ]
        assert not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # kill -9 left the lock behind: its owner is dead, so the next run takes it over.
    assert (run_dir / LOCK_NAME).exists()
    with RunDirLock(run_dir) as lock:
        assert lock.held and f'"pid": {os.getpid()}' in (run_dir / LOCK_NAME).read_text()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_config_error_leaves_no_run_directory(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model.heads=7", "model.d_model=512"],
        cwd=tmp_path,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "config error: model.d_model=512 is not divisible by model.heads=7; pick model.heads that divides model.d_model"
    ]
    assert list((tmp_path / "outputs").glob("*")) == []


def test_ctrl_c_saves_a_checkpoint_and_prints_a_command_that_resumes(tmp_path):
    cmd = tiny(
        tmp_path,
        "trainer.max_steps=100000",
        "trainer.val_check_interval=1000",
        "callbacks=[model_checkpoint,rng_state,preemption]",
        "logger=csv",
        "callbacks.recovery_checkpoint.every_n_train_steps=5",
    )
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    # A recovery checkpoint means the training loop runs (the handler is installed at its start).
    while not any(any(d.joinpath("checkpoints").glob("recovery-*.ckpt")) for d in run_dirs(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    step = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert "received SIGINT: saving a checkpoint after the current optimizer step" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("interrupted at step")]
    assert line.startswith(f"interrupted at step {step}: checkpoint {hpc}; resume with: python ")
    resume = shlex.split(line.split("resume with: ")[1])
    assert resume[-1] == f"hydra.run.dir={run_dir.resolve()}"
    # The printed command, run with a reachable end, continues from the checkpoint in the same directory.
    done = subprocess.run(
        [sys.executable, *resume[1:], f"trainer.max_steps={step + 3}"],
        cwd=tmp_path,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from {hpc}" in done.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 3
    assert len(run_dirs(tmp_path)) == 1


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB tmpfs (needs root); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_checkpointing_is_one_line_and_the_previous_checkpoints_resume(tmp_path, small_fs):
    """d_model=48, 2 layers: ~0.7 MB per checkpoint with AdamW state, so the first fits the 1 MiB disk
    and the second does not."""
    ckpt_dir = small_fs / "checkpoints"
    cmd = tiny(
        tmp_path,
        "optim=adamw",  # the checkpoint size above counts AdamW's two moments
        "model.d_model=48",
        "model.n_layers=2",
        "trainer.max_steps=6",
        "trainer.val_check_interval=100",
        "callbacks=[model_checkpoint]",
        "logger=csv",
        "callbacks.model_checkpoint.save_last=false",
        "callbacks.recovery_checkpoint.every_n_train_steps=2",
        "callbacks.recovery_checkpoint.save_top_k=-1",
        f"paths.checkpoint_dir={ckpt_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    done = subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: checkpoint recovery-step000004.ckpt could not be written to {ckpt_dir}: no space "
        "left on device; the checkpoints already there are intact (nothing was overwritten): free "
        "space and run the same command in the same run directory to resume from the newest"
    ]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["recovery-step000002.ckpt"]  # no temp file left
    resumed = subprocess.run(
        cmd + ["trainer.max_steps=3"], cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {ckpt_dir / 'recovery-step000002.ckpt'}" in resumed.stdout, resumed.stderr[-3000:]


def test_a_lock_from_another_host_is_refused_unless_it_is_this_slurm_jobs_earlier_run(tmp_path, monkeypatch):
    import json

    from mqa_lm.training.run_dir import RunDirInUseError

    foreign = {"pid": 1, "host": "node-that-is-not-this-one", "started": "2026-01-01 00:00:00", "slurm_job": "77"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(foreign))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunDirInUseError, match="pid 1 on host node-that-is-not-this-one"):
        RunDirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(RunDirInUseError):
        RunDirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the requeued job: its earlier run has ended
    with RunDirLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_second_ctrl_c_stops_at_once_and_releases_the_run_directory(tmp_path):
    """The handler as training installs it, sent two real SIGINTs: the first asks for a checkpoint at
    the next step boundary (none comes here), the second exits 130 at once, lock released."""
    script = (
        "import os, signal, time\n"
        "from mqa_lm.training.checkpointing import PreemptionCallback\n"
        "from mqa_lm.training.run_dir import RunDirLock\n"
        f"RunDirLock({str(tmp_path)!r}).acquire()\n"
        "cb = PreemptionCallback()\n"
        "signal.signal(signal.SIGINT, cb._handle)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.2)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('still running')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        "received SIGINT: saving a checkpoint after the current optimizer step, then stopping (Ctrl-C again stops "
        "at once, without one)",
        "received SIGINT again: stopping now, without a checkpoint (the last saved one is kept)",
    ]
    assert not (tmp_path / LOCK_NAME).exists()
