"""Preemption: a signal (SIGTERM, SLURM's or submitit's SIGUSR1/SIGUSR2 before the time limit) becomes
a checkpoint at the next optimizer-step boundary, a ``scontrol requeue`` under SLURM, and an exit."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from mqa_lm.training.checkpointing.io import next_hpc_path
from mqa_lm.utils.config import check_int

# The one set of defaults (configs/callbacks/preemption.yaml repeats them for the command line):
# sbatch --signal=SIGUSR1@90 and submitit's SIGUSR2 warn before the time limit, so both requeue.
# SIGINT (Ctrl-C) is handled like SIGTERM; a second SIGINT stops at once, without a checkpoint.
DEFAULT_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
DEFAULT_REQUEUE_SIGNALS: tuple[str, ...] = ("SIGUSR1", "SIGUSR2")


def _signum(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    if not hasattr(signal, key):
        raise ValueError(f"unknown signal {name!r} in callbacks.preemption; use names like SIGTERM, SIGUSR1")
    return signal.Signals(getattr(signal, key))


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with 128 + the signal number."""

    def __init__(self, signum: int, path: str, step: int) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.path, self.step = int(signum), path, step


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` inside job arrays)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionCallback(L.Callback):
    """On a preemption signal: checkpoint at the next optimizer-step boundary, requeue on SLURM, exit.

    A signal handler may run between any two bytecodes, e.g. half-way through ``optimizer.step``;
    saving there (as Lightning's own SLURM handler does) can record half-updated weights. Here the
    handler only sets a flag; the save happens in ``on_train_batch_end`` after an optimizer step,
    when model, optimizer, schedule, step counter, RNG and data position agree. Ranks agree on the
    step by an any-reduce, since a signal reaches each process at a slightly different time; that
    collective (and the host sync of reading its result) runs every ``check_every_n_steps`` optimizer
    steps, not every step, so it costs the training loop next to nothing. One process checks every step.

    Args:
        signals: signal names handled while training runs.
        requeue_signals: those of ``signals`` that also ``scontrol requeue`` the job when running
            under SLURM (SLURM sends them ahead of the time limit: ``--signal=SIGUSR1@90``).
        check_every_n_steps: with several ranks, how often (in optimizer steps) they agree on
            whether a signal arrived; the save then happens at the next multiple of it.
    """

    def __init__(
        self,
        signals: Sequence[str | int] = DEFAULT_SIGNALS,
        requeue_signals: Sequence[str | int] = DEFAULT_REQUEUE_SIGNALS,
        check_every_n_steps: int = 10,
    ) -> None:
        check_int(check_every_n_steps, "callbacks.preemption.check_every_n_steps")
        self.check_every_n_steps = check_every_n_steps
        self.signals = [_signum(s) for s in signals]
        self.requeue_signals = {_signum(s) for s in requeue_signals}
        unknown = self.requeue_signals - set(self.signals)
        if unknown:
            raise ValueError(
                f"callbacks.preemption.requeue_signals {sorted(s.name for s in unknown)} are not in "
                "callbacks.preemption.signals; "
                "add them there too"
            )
        self._received: int | None = None
        self._step_seen: int | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received = None
        self._step_seen = trainer.global_step
        self._trainer = trainer
        # Installed here, after Lightning registered its own handlers (it does so just before the
        # fit loop), so these replace them: Lightning's SIGTERM path stops mid-accumulation.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self._received is None
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if not first:
            if signum == signal.SIGINT:
                self._abort(launcher)
            return
        self._received = signum
        hint = " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""
        print(
            f"received {signal.Signals(signum).name}: saving a checkpoint after the current optimizer step, "
            f"then stopping{hint}",
            file=sys.stderr,
            flush=True,
        )
        # A terminal's Ctrl-C reaches every process of its group, the DDP ranks included: passing
        # SIGINT on would be their second one. The ranks agree on stopping by any-reduce anyway.
        if launcher is not None and hasattr(launcher, "kill") and signum != signal.SIGINT:
            launcher.kill(signum)  # ranks started by `trainer=ddp` are our children: pass it on

    def _abort(self, launcher: Any) -> None:
        print(
            "received SIGINT again: stopping now, without a checkpoint (the last saved one is kept)",
            file=sys.stderr,
            flush=True,
        )
        if launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signal.SIGKILL)
        from mqa_lm.training.run_dir import release_held_locks

        release_held_locks()
        os._exit(128 + signal.SIGINT)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_seen:
            return  # mid-accumulation: gradients of this step are not in any checkpoint
        self._step_seen = trainer.global_step
        stop = self._received is not None
        if trainer.world_size > 1:
            if trainer.global_step % self.check_every_n_steps:
                return  # every rank skips the same steps, so the collective below stays matched
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = int(trainer.strategy.broadcast(self._received or 0, src=0)) or int(self._received or signal.SIGTERM)
        path = trainer.strategy.broadcast(next_hpc_path(trainer.default_root_dir), src=0)
        trainer.save_checkpoint(path)
        requeued = ""
        if trainer.is_global_zero and signum in self.requeue_signals and SLURMEnvironment.detect():
            requeued = self._requeue()
        if trainer.is_global_zero:
            what = "interrupted" if signum == signal.SIGINT else "preempted"
            print(
                f"{what} at step {trainer.global_step}: checkpoint {path}{requeued}; resume with: "
                f"{resume_command(trainer.default_root_dir)}",
                file=sys.stderr,
                flush=True,
            )
        raise Preempted(signum, path, trainer.global_step)

    @staticmethod
    def _requeue() -> str:
        job_id = slurm_job_id()
        if not job_id or not re.fullmatch(r"[0-9_]+", job_id):
            return f"; not requeued: SLURM_JOB_ID is {job_id!r}"
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            return f"; `scontrol requeue {job_id}` failed ({result.returncode}): {result.stderr.strip()}"
        return f"; requeued SLURM job {job_id}"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        self._trainer = None


def resume_command(run_dir: str | os.PathLike[str]) -> str:
    """This process's command line, made to continue in ``run_dir``: ``hydra.run.dir`` pinned (each
    new run otherwise gets a new directory), ``ckpt_path``/``resume`` dropped (resume=auto finds
    the newest checkpoint there)."""
    dropped = ("hydra.run.dir=", "ckpt_path=", "resume=", "+ckpt_path=", "++ckpt_path=", "++resume=")
    args = [a for a in sys.argv[1:] if not a.startswith(dropped)]
    return shlex.join(["python", sys.argv[0], *args, f"hydra.run.dir={os.path.abspath(run_dir)}"])


def slurm_environment() -> SLURMEnvironment | None:
    """Under SLURM (srun), a SLURMEnvironment with Lightning's own requeue off, for runs with a
    :class:`PreemptionCallback` (which requeues at a step boundary instead); else None."""
    # torchrun inside an allocation sets both; Lightning would pick SLURM's (wrong) world size.
    if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        return SLURMEnvironment(auto_requeue=False)
    return None
