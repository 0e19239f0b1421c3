"""Fault tolerance: atomic checkpoint writes, resume discovery, exact RNG resume, preemption signals.

What a run gets from here (``train()`` wires it in; see README "Scaling out and resuming"):

* :class:`AtomicCheckpointIO` writes every checkpoint to a temp file in the checkpoint's own
  directory, fsyncs it and renames it into place, so a kill mid-write leaves the previous file whole.
* :func:`resume_checkpoint` (``resume=auto``) finds the newest checkpoint of the run directory that
  is complete and loads with ``weights_only=True``; a truncated or corrupt one is skipped with a
  warning, one that carries pickled code is refused.
* :class:`RNGStateCallback` saves the torch, CUDA, numpy and Python random states of an optimizer
  step boundary, so dropout after a resume draws what the uninterrupted run drew.
* :class:`PreemptionCallback` turns SIGTERM / SIGUSR1 (SLURM's warning before the time limit) into
  a checkpoint at the next optimizer-step boundary, a ``scontrol requeue`` under SLURM, and an exit.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import uuid
import warnings
import zipfile
from pathlib import Path
from types import FrameType
from typing import Any, Iterable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig


RESUME_MODES = ("auto", "never")
HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class CorruptCheckpointError(CheckpointError):
    """Truncated, unreadable or not a training checkpoint (auto-resume falls back to an older one)."""


class UnsafeCheckpointError(CheckpointError):
    """Carries pickled Python objects that ``weights_only=True`` refuses (never loaded, never skipped)."""


# ---- atomic writes ----------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file or the complete new one.

    The temp file lives in the target's directory (``os.replace`` is only atomic within one
    filesystem; fsspec's transaction stages in ``$TMPDIR`` and then copies). It is created with
    ``O_EXCL`` and the process umask, fsynced before the rename, and the directory after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, with local files written by :func:`atomic_torch_save`.

    Remote URLs (``s3://`` ...) keep Lightning's own writer: object stores publish whole objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


# ---- checkpoint validation and discovery ------------------------------------------------------


def _unsafe_detail(err: BaseException) -> str:
    for line in str(err).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip()
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _load_weights_only(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise UnsafeCheckpointError(
                f"checkpoint {path} carries pickled Python objects ({_unsafe_detail(err)}), and unpickling "
                "them can run arbitrary code, so it is not loaded (checkpoints load with weights_only=True). "
                "If you trust the file, re-save it with plain tensors and containers only; otherwise start "
                "from another checkpoint (ckpt_path=...) or another run directory"
            ) from None
        raise CorruptCheckpointError(f"checkpoint {path} cannot be unpickled ({err})") from None
    except CheckpointError:
        raise
    except Exception as err:  # torch raises RuntimeError/EOFError/... for damaged files
        raise CorruptCheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from None


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete, weights-only training checkpoint.

    Files: the zip archive must be whole and every member must match its CRC-32 (a truncated or
    bit-flipped file fails here), then the pickle must load with ``weights_only=True`` and hold
    ``state_dict`` and ``global_step``. Directories (FSDP sharded checkpoints) must hold the
    ``.metadata`` that torch.distributed.checkpoint writes last, and a weights-only ``meta.pt``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise CorruptCheckpointError(
                f"sharded checkpoint {path} has no .metadata (written last), so it is incomplete"
            )
        if (path / "meta.pt").is_file():
            _load_weights_only(path / "meta.pt", mmap=False)
        return
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"checkpoint {path} is empty")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                members = zf.infolist()
                # torch.serialization.set_crc32_options(False) writes zero CRCs: nothing to compare then.
                if any(m.CRC for m in members):
                    bad = zf.testzip()
                    if bad is not None:
                        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: member {bad} fails its CRC-32")
        except zipfile.BadZipFile as err:
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt ({err})") from None
    elif path.read_bytes()[:2] == b"PK":
        raise CorruptCheckpointError(f"checkpoint {path} is a truncated zip archive (no central directory)")
    ckpt = _load_weights_only(path, mmap=is_zip)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CorruptCheckpointError(
            f"{path} is not a Lightning training checkpoint (no state_dict/global_step; found {keys})"
        )


def _candidates(checkpoint_dirs: Iterable[Path], hpc_dirs: Iterable[Path]) -> list[Path]:
    found: dict[Path, None] = {}
    for directory in checkpoint_dirs:
        if directory.is_dir():
            for p in directory.iterdir():
                if p.suffix == ".ckpt" and not p.name.startswith("."):
                    found[p.resolve()] = None
    for directory in hpc_dirs:
        if directory.is_dir():
            for p in directory.iterdir():
                if HPC_PATTERN.match(p.name):
                    found[p.resolve()] = None

    def newest_first(p: Path) -> tuple[int, int, str]:
        hpc = HPC_PATTERN.match(p.name)
        return (p.stat().st_mtime_ns, int(hpc.group(1)) if hpc else -1, p.name)

    return sorted(found, key=newest_first, reverse=True)


def find_resume_checkpoint(checkpoint_dirs: Sequence[str | Path], hpc_dirs: Sequence[str | Path] = ()) -> Path | None:
    """The newest valid checkpoint: any ``*.ckpt`` in ``checkpoint_dirs``, ``hpc_ckpt_N.ckpt`` in ``hpc_dirs``.

    Newest means last modified (``last.ckpt``, a step checkpoint and Lightning's hpc checkpoint
    compete on equal terms). A corrupt candidate is skipped with a warning that names it and the
    next one is tried; an unsafe one (pickled code) raises :class:`UnsafeCheckpointError`.
    Nothing is deleted or rewritten. Leftover temp files of interrupted atomic writes are reported.
    """
    dirs = [Path(d) for d in checkpoint_dirs]
    hpc = [Path(d) for d in hpc_dirs]
    for directory in dirs:
        stale = sorted(directory.glob(".*.ckpt.*.tmp")) if directory.is_dir() else []
        if stale:
            warnings.warn(
                f"{len(stale)} temp file(s) of interrupted checkpoint writes in {directory} "
                f"(e.g. {stale[0].name}); they are not used and can be deleted",
                stacklevel=2,
            )
    for candidate in _candidates(dirs, hpc):
        try:
            verify_checkpoint(candidate)
        except CorruptCheckpointError as err:
            warnings.warn(f"skipping checkpoint: {err}; trying the previous one", stacklevel=2)
            continue
        return candidate
    return None


def checkpoint_dirs(cfg: DictConfig) -> tuple[list[Path], list[Path]]:
    """(ModelCheckpoint dirpaths, hpc checkpoint dirs) of a composed ``train.yaml`` config."""
    dirs = []
    for cb in (cfg.get("callbacks") or {}).values():
        if cb is not None and str(cb.get("_target_", "")).endswith("ModelCheckpoint") and cb.get("dirpath"):
            dirs.append(Path(str(cb.dirpath)))
    root = cfg.trainer.get("default_root_dir") or cfg.paths.output_dir
    return dirs, [Path(str(root))]


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` should start from, or None for a fresh run.

    An explicit ``ckpt_path`` wins (and is verified, with no fallback); else ``resume=auto`` looks
    for the newest valid checkpoint of the run directory; ``resume=never`` starts fresh.
    """
    explicit = cfg.get("ckpt_path")
    if explicit:
        if explicit not in ("last", "best", "hpc", "registry"):
            verify_checkpoint(explicit)
        return str(explicit)
    mode = cfg.get("resume", "auto")
    mode = "never" if mode in (None, False) else str(mode)
    if mode not in RESUME_MODES:
        raise ValueError(f"resume={mode!r} is not one of {', '.join(RESUME_MODES)}; use resume=auto or resume=never")
    if mode == "never":
        return None
    dirs, hpc = checkpoint_dirs(cfg)
    found = find_resume_checkpoint(dirs, hpc)
    if found is not None and _is_rank_zero():
        print(f"resuming from {found} (resume=auto; resume=never starts fresh)", flush=True)
    return None if found is None else str(found)


def _is_rank_zero() -> bool:
    # Before the Trainer exists the launcher's environment is the only record of the rank.
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


# ---- random states ----------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """torch, CUDA (current device), numpy and Python random states as weights-only-safe values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (a saved CUDA state is skipped on a machine without CUDA)."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGStateCallback(L.Callback):
    """Makes the random streams a function of the optimizer step, and saves them in checkpoints.

    The state is captured when an optimizer step completes and put back when the next step's first
    micro-batch starts, so whatever draws in between (a validation DataLoader's iterator, a new
    epoch's iterator, a checkpoint save) leaves training untouched, and a run resumed from a
    checkpoint of step ``k`` continues from exactly the state the uninterrupted run had after step
    ``k``. Every rank restores the state rank 0 saved: ranks are seeded alike by ``seed_everything``.
    """

    def __init__(self) -> None:
        self._boundary: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._step_seen: int | None = None
        self._restore_next = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_seen = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            self._boundary, self._pending = self._pending, None
            self._restore_next = True
        if self._restore_next and self._boundary is not None:
            restore_rng_state(self._boundary)
        self._restore_next = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._step_seen:  # this micro-batch completed an optimizer step
            self._step_seen = trainer.global_step
            self._boundary = capture_rng_state()
            self._restore_next = True

    def state_dict(self) -> dict[str, Any]:
        return {} if self._boundary is None else {"rng": self._boundary}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")


# ---- preemption -------------------------------------------------------------------------------


def _signum(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    key = str(name).upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    if not hasattr(signal, key):
        raise ValueError(f"unknown signal {name!r} in preemption settings; use names like SIGTERM, SIGUSR1")
    return signal.Signals(getattr(signal, key))


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with 128 + the signal number."""

    def __init__(self, signum: int, path: str, step: int) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.path, self.step = int(signum), path, step


def next_hpc_path(directory: str | Path) -> str:
    """``hpc_ckpt_{N+1}.ckpt`` in ``directory`` (Lightning's SLURM checkpoint naming)."""
    directory = Path(directory)
    numbers = [int(m.group(1)) for p in directory.glob("hpc_ckpt_*.ckpt") if (m := HPC_PATTERN.match(p.name))]
    return str(directory / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


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

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1"), requeue_signals: Sequence[str] = ("SIGUSR1",),
                 check_every_n_steps: int = 10) -> None:
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"preemption.check_every_n_steps must be an integer >= 1, got {check_every_n_steps!r}")
        self.check_every_n_steps = check_every_n_steps
        self.signals = [_signum(s) for s in signals]
        self.requeue_signals = {_signum(s) for s in requeue_signals}
        unknown = self.requeue_signals - set(self.signals)
        if unknown:
            raise ValueError(
                f"preemption.requeue_signals {sorted(s.name for s in unknown)} are not in preemption.signals; "
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
        self._received = signum
        if not first:
            return
        print(f"received {signal.Signals(signum).name}: saving a checkpoint after the current optimizer step, "
              "then stopping", file=sys.stderr, flush=True)
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # ranks started by `trainer=ddp` are our children: pass it on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
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
            print(f"preempted at step {trainer.global_step}: checkpoint {path}{requeued}; the same command "
                  "in the same run directory resumes from it", file=sys.stderr, flush=True)
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


# ---- wiring for train() -----------------------------------------------------------------------


def fault_tolerance_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """RNG state (always: exact resume needs it) and the preemption handler (``preemption.enabled``)."""
    callbacks: list[L.Callback] = [RNGStateCallback()]
    pre = cfg.get("preemption") or {}
    if pre.get("enabled", True):
        callbacks.append(PreemptionCallback(
            signals=list(pre.get("signals", ("SIGTERM", "SIGUSR1", "SIGUSR2"))),
            requeue_signals=list(pre.get("requeue_signals", ("SIGUSR1", "SIGUSR2"))),
            check_every_n_steps=int(pre.get("check_every_n_steps", 10)),
        ))
    return callbacks


def fault_tolerance_plugins(cfg: DictConfig) -> list[Any]:
    """Atomic checkpoint IO, and under SLURM (srun) a SLURMEnvironment with Lightning's requeue off
    (:class:`PreemptionCallback` does it at a step boundary instead)."""
    plugins: list[Any] = [AtomicCheckpointIO()]
    pre = cfg.get("preemption") or {}
    # torchrun inside an allocation sets both; Lightning would pick SLURM's (wrong) world size.
    if pre.get("enabled", True) and SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def merge_plugins(own: list[Any], extra: list[Any]) -> list[Any]:
    """The trainer's own (instantiated) ``plugins`` plus ``extra``; the user's CheckpointIO or cluster
    environment wins over ours of the same kind."""
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment

    kinds = (CheckpointIO, ClusterEnvironment)
    taken = {k for k in kinds for p in own if isinstance(p, k)}
    return list(own) + [p for p in extra if not any(isinstance(p, k) for k in taken)]
