"""Fault tolerance: a run killed (SIGKILL, SIGTERM, SLURM's SIGUSR1) and restarted with the same command
ends bitwise equal to an uninterrupted run; damaged and unsafe checkpoints; atomic writes."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, ROOT, run_env, tiny_run

from mqa_lm.training.checkpointing import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    capture_rng_state,
    find_resume_checkpoint,
    restore_rng_state,
    verify_checkpoint,
)

MAX_STEPS = 240
EVERY = 20


@pytest.fixture(scope="module", params=["adamw", "muon"])
def shared(request, tmp_path_factory) -> Path:
    """The corpus and the runs of one optimizer (optim=<param>): every resume test runs under both."""
    base = tmp_path_factory.mktemp(f"ft-{request.param}")
    (base / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    (base / "optim").write_text(request.param)
    return base


def command(base: Path, run_dir: Path) -> list[str]:
    """One CPU run: dropout on (so RNG restore matters), deterministic, checkpoints every EVERY steps,
    with the optimizer the ``shared`` fixture picked."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"optim={(base / 'optim').read_text()}",
        "data=text",
        f"data.paths=[{base / 'corpus.txt'}]",
        *tiny_run(base / "cache"),
        "model.resid_pdrop=0.1",
        "model.emb_pdrop=0.1",
        "model.attn_pdrop=0.1",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.val_check_interval=50",
        "trainer.deterministic=true",
        "optim.warmup_steps=10",
        "callbacks=[model_checkpoint,rng_state,preemption]",
        f"callbacks.recovery_checkpoint.every_n_train_steps={EVERY}",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        "sample.max_new_tokens=0",
    ]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"tensors differ from the uninterrupted run: {differing}"


@pytest.fixture(scope="module")
def straight(shared) -> subprocess.Popen:
    """The uninterrupted run, started once and shared (runs alongside the interrupted ones)."""
    run_dir = shared / "straight"
    proc = subprocess.Popen(
        command(shared, run_dir), env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    proc.run_dir = run_dir  # type: ignore[attr-defined]
    yield proc
    if proc.poll() is None:
        proc.kill()


def straight_weights(proc: subprocess.Popen) -> dict[str, torch.Tensor]:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return weights(proc.run_dir)  # type: ignore[attr-defined]


def wait_for_checkpoints(proc: subprocess.Popen, ckpt_dir: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout

    def newest_step() -> int:
        # Only the two newest recovery checkpoints are kept, so count by step, not by files.
        steps = [int(p.stem.split("step")[-1]) for p in ckpt_dir.glob("recovery-step*.ckpt")]
        return max(steps, default=0)

    while newest_step() < count * EVERY:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its checkpoint #{count}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint #{count} within {timeout}s")
        time.sleep(0.02)


def interrupt(base: Path, run_dir: Path, signum: int, **extra_env: str) -> tuple[int, str]:
    """Start a run, send ``signum`` at a random moment after its first checkpoint; (returncode, output)."""
    proc = subprocess.Popen(
        command(base, run_dir), env=run_env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    rng = random.Random()
    wait_for_checkpoints(proc, run_dir / "checkpoints", rng.randint(1, 3))
    time.sleep(rng.uniform(0.0, 0.3))
    assert proc.poll() is None, "the run finished before it could be interrupted; raise MAX_STEPS"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def restart(base: Path, run_dir: Path, **extra_env: str) -> str:
    done = subprocess.run(command(base, run_dir), env=run_env(**extra_env), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_sigkill_then_same_command_ends_bitwise_equal(shared, straight):
    run_dir = shared / "killed"
    code, out = interrupt(shared, run_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-2000:]
    logged_before = logged_steps(run_dir)
    assert logged_before, "the interrupted run logged nothing"
    out = restart(shared, run_dir)
    assert f"resuming from {run_dir}" in out
    assert_bitwise_equal(weights(run_dir), straight_weights(straight))
    # The continued run appends to the CSV log, after dropping the first attempt's rows of the steps
    # it replays: each step once, as the uninterrupted run logged them.
    logged_after = logged_steps(run_dir)
    assert logged_after[: len(logged_before)] != logged_before or len(logged_after) > len(logged_before)
    assert logged_after == logged_steps(straight.run_dir)
    assert max(logged_after) == MAX_STEPS - 1


def logged_steps(run_dir: Path) -> list[int]:
    import csv

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


# The signal paths below save and resume as SIGKILL's does, which runs under both optimizers; each
# optimizer's state resumes exactly in tests/test_training.py. They run under AdamW only.
ONE_OPTIMIZER = pytest.mark.parametrize("shared", ["adamw"], indirect=True)


@ONE_OPTIMIZER
def test_sigterm_saves_at_a_step_boundary_and_restart_ends_bitwise_equal(shared, straight):
    run_dir = shared / "terminated"
    code, out = interrupt(shared, run_dir, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_file(), out[-3000:]
    saved = torch.load(hpc, map_location="cpu", weights_only=True)
    assert 0 < saved["global_step"] < MAX_STEPS
    assert f"preempted at step {saved['global_step']}: checkpoint {hpc}" in out
    out = restart(shared, run_dir)
    assert f"resuming from {hpc}" in out
    assert_bitwise_equal(weights(run_dir), straight_weights(straight))


@ONE_OPTIMIZER
def test_slurm_sigusr1_saves_requeues_and_the_requeued_job_resumes(shared, straight, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = dict(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="mqa",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NODELIST="localhost",
        SLURM_NTASKS_PER_NODE="1",
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    run_dir = shared / "slurm-4242"
    code, out = interrupt(shared, run_dir, signal.SIGUSR1, **slurm)
    assert code == 128 + signal.SIGUSR1, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and "requeued SLURM job 4242" in out

    out = restart(shared, run_dir, SLURM_RESTART_COUNT="1", **slurm)  # what the requeued job runs
    assert f"resuming from {hpc}" in out
    assert calls.read_text().split() == ["requeue", "4242"]  # no second requeue on a normal finish
    assert_bitwise_equal(weights(run_dir), straight_weights(straight))


def test_ddp_ranks_agree_on_a_checked_step_then_resume(tmp_path):
    """Two gloo ranks: SIGTERM is acted on at the next multiple of check_every_n_steps (the only steps
    with a collective), the checkpoint is saved once, and the same command resumes from it. Under one
    optimizer: what the ranks agree on does not depend on it (each optimizer's exact resume is tested
    above), and two processes per run make this the module's slowest test."""
    shared = tmp_path / "base"
    shared.mkdir()
    (shared / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    (shared / "optim").write_text("adamw")
    run_dir = tmp_path / "ddp-terminated"
    extra = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "callbacks.preemption.check_every_n_steps=7",
    ]

    def ddp_command(base: Path, rd: Path) -> list[str]:
        cmd = [a for a in command(base, rd) if not a.startswith("trainer=")]
        return cmd[:2] + extra + cmd[2:]

    proc = subprocess.Popen(
        ddp_command(shared, run_dir), env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_checkpoints(proc, run_dir / "checkpoints", 1, timeout=180)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    saved = torch.load(hpc, map_location="cpu", weights_only=True)
    assert saved["global_step"] % 7 == 0 and 0 < saved["global_step"] < MAX_STEPS, saved["global_step"]
    assert not (run_dir / "hpc_ckpt_2.ckpt").exists()
    done = subprocess.run(ddp_command(shared, run_dir), env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from {hpc}" in done.stdout + done.stderr
    assert f"`max_steps={MAX_STEPS}` reached" in done.stdout + done.stderr


# ---- checkpoint files -------------------------------------------------------------------------


def fake_checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), float(step))}, "global_step": step, "epoch": 0}


def write_ckpts(directory: Path, steps: list[int]) -> list[Path]:
    io = AtomicCheckpointIO()
    paths = []
    for i, step in enumerate(steps):
        path = directory / f"recovery-step{step:06d}.ckpt"
        io.save_checkpoint(fake_checkpoint(step), path)
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # strictly increasing mtimes
        paths.append(path)
    return paths


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    ckpts = tmp_path / "checkpoints"
    older, newest = write_ckpts(ckpts, [10, 20])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_resume_checkpoint([ckpts]) == newest.resolve()
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    os.utime(newest, ns=(10**18 + 5 * 10**9,) * 2)
    with pytest.warns(
        UserWarning, match=r"skipping checkpoint: checkpoint .*recovery-step000020.ckpt.*trying the previous"
    ):
        assert find_resume_checkpoint([ckpts]) == older.resolve()


def test_bit_flip_inside_a_checkpoint_is_detected(tmp_path):
    (path,) = write_ckpts(tmp_path, [7])
    data = bytearray(path.read_bytes())
    payload_at = data.find(b"\x00\x00\xe0\x40")  # a float 7.0 of the tensor payload
    assert payload_at > 0
    data[payload_at + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC-32"):
        verify_checkpoint(path)


def test_hpc_checkpoint_newer_than_last_is_chosen(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (last,) = write_ckpts(ckpts, [30])
    last = last.rename(ckpts / "last.ckpt")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    AtomicCheckpointIO().save_checkpoint(fake_checkpoint(35), hpc)
    os.utime(hpc, ns=(10**18 + 9 * 10**9,) * 2)
    assert find_resume_checkpoint([ckpts], [tmp_path]) == hpc.resolve()
    os.utime(last, ns=(10**18 + 10 * 10**9,) * 2)
    assert find_resume_checkpoint([ckpts], [tmp_path]) == last.resolve()


class Payload:
    """Pickled by reference: loading it would import and call code."""


def test_checkpoint_carrying_pickled_code_is_refused_not_skipped(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (older,) = write_ckpts(ckpts, [10])
    evil = ckpts / "last.ckpt"
    torch.save({**fake_checkpoint(20), "extra": Payload()}, evil)
    os.utime(evil, ns=(10**18 + 9 * 10**9,) * 2)
    with pytest.raises(UnsafeCheckpointError, match=r"last.ckpt carries pickled Python objects .*Payload"):
        find_resume_checkpoint([ckpts])


class SystemCall:
    """Pickles as a call of os.system, as a hostile checkpoint would."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_random_bytes_as_newest_checkpoint_are_skipped_as_corrupt(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (older,) = write_ckpts(ckpts, [10])
    junk = ckpts / "last.ckpt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    os.utime(junk, ns=(10**18 + 9 * 10**9,) * 2)
    with pytest.warns(UserWarning, match=r"skipping checkpoint: checkpoint .*last.ckpt is corrupt"):
        assert find_resume_checkpoint([ckpts]) == older.resolve()
    # A whole zip (valid CRCs) whose pickle is garbage is corrupt too: no global names code.
    import zipfile

    garbled = ckpts / "garbled.ckpt"
    with zipfile.ZipFile(garbled, "w") as zf:
        zf.writestr("archive/data.pkl", random.Random(1).randbytes(512))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(CorruptCheckpointError):
        verify_checkpoint(garbled)


def test_unsafe_checkpoint_names_the_global_and_never_suggests_weights_only_false(tmp_path):
    evil = tmp_path / "last.ckpt"
    torch.save({**fake_checkpoint(20), "extra": SystemCall()}, evil)
    with pytest.raises(UnsafeCheckpointError) as err:
        verify_checkpoint(evil)
    message = str(err.value)
    assert f"{os.system.__module__}.system" in message  # posix.system on Linux
    assert "weights_only=False" not in message and "add_safe_globals" not in message
    assert "re-save the weights" in message and "\n" not in message


def test_interrupted_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(fake_checkpoint(1), path)
    before = path.read_bytes()
    # A tensor is written before the lambda fails to pickle: the write dies half-way.
    with pytest.raises((AttributeError, TypeError)):  # pickle refuses the lambda
        io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 2, "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    path = tmp_path / "rng.ckpt"
    AtomicCheckpointIO().save_checkpoint({"rng": state}, path)
    loaded = torch.load(path, weights_only=True)["rng"]
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(loaded)
    torch.testing.assert_close(torch.rand(4), expected[0], rtol=0, atol=0)
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_the_csv_log_is_on_disk_as_soon_as_a_row_is_logged(tmp_path):
    """Rows are written through, not buffered until Lightning's next flush (every 100 steps): a run
    killed after a checkpoint keeps the rows of the steps before it, which its continuation does not
    log again (the race test_sigkill_then_same_command_ends_bitwise_equal hits at random)."""
    from mqa_lm.training.loggers import ResumableCSVLogger

    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version=0)
    logger.log_metrics({"train/loss": 2.5}, step=9)
    logger.log_metrics({"train/loss": 2.25, "lr": 1e-3}, step=19)
    with open(logger.experiment.metrics_file_path) as file:
        rows = list(csv.DictReader(file))
    assert [(r["step"], r["train/loss"], r["lr"]) for r in rows] == [("9", "2.5", ""), ("19", "2.25", "0.001")]
