"""Run directories: a unique name per run, one live run per directory, nothing left by a failed start.

* ``${run_id:}`` (configs/hydra/default.yaml): a suffix that differs between runs started in the same
  second and is the same for every rank of one run.
* :class:`RunDirLock`: ``<run>/.run.lock`` (owner pid, host, start time), held by the launching
  process; a second run in the directory is refused, a lock left by a dead process is taken over.
* :func:`remove_if_unused`: a run that stopped before doing anything leaves no directory behind.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

LOCK_NAME = ".run.lock"


def run_id() -> str:
    """A per-run suffix for ``hydra.run.dir``, equal on every process of one run.

    Ranks that each run ``train.py`` themselves need an id they share: torchrun's rendezvous id (or
    its agent, their common parent), SLURM's job and step. A single process (which may later start
    Lightning's DDP ranks; those get the resolved directory on their command line) uses its pid,
    which no other live process on the host has.
    """
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return env["TORCHELASTIC_RUN_ID"]
    if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        return f"p{os.getppid()}"  # torchrun without a rendezvous id: the agent's pid
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return f"j{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    return str(os.getpid())


def register_resolvers() -> None:
    """Register ``${run_id:}`` (cached, like Hydra's ``${now:}``, so every read of it agrees)."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)


_HELD: set[RunDirLock] = set()


def release_held_locks() -> None:
    """Release this process's run-directory locks (before an ``os._exit`` that skips ``finally``)."""
    for lock in list(_HELD):
        lock.release()


class RunDirInUseError(RuntimeError):
    """Another live run holds the directory; the message names it and what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunDirLock:
    """``<directory>/.run.lock`` for as long as a run uses ``directory`` (a context manager).

    Created with ``O_EXCL``, so of two runs starting together exactly one gets it. A lock whose
    owner is a dead process on this host (a run killed with SIGKILL, a crashed node's restart) is
    stale, and so is one of this SLURM job's earlier run (a requeue may land on another node): it is
    renamed away (one taker wins the rename) and taken. Any other lock from another host cannot be
    checked and is refused with the file to delete.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.held = False
        self.created = False

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: treated as foreign (refused), never deleted blindly
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> None:
        self.created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                pid, host = owner.get("pid"), owner.get("host")
                stale = host == me["host"] and isinstance(pid, int) and (pid == me["pid"] or not _alive(pid))
                # A requeued SLURM job may restart on another node: its earlier run has ended by then.
                stale = stale or (me["slurm_job"] is not None and owner.get("slurm_job") == me["slurm_job"])
                if not stale:
                    who = f"pid {pid} on host {host}, since {owner.get('started')}" if pid else "unreadable lock"
                    raise RunDirInUseError(
                        f"run directory {self.directory} is in use by another run ({who}); wait for it to finish "
                        f"or choose another hydra.run.dir (if no run is using it, delete {self.path})"
                    ) from None
                try:
                    os.rename(self.path, self.path.with_name(f"{LOCK_NAME}.stale.{me['pid']}"))
                except FileNotFoundError:
                    continue  # another run took it over first: try again, and meet its live lock
                self.path.with_name(f"{LOCK_NAME}.stale.{me['pid']}").unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            _HELD.add(self)
            return
        raise RunDirInUseError(f"could not lock run directory {self.directory}: {self.path} keeps changing")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.discard(self)
        owner = self._owner()
        if owner is not None and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created:  # a directory the lock made and nothing else used goes with it
            try:
                self.directory.rmdir()
            except OSError:
                pass  # not empty: the run wrote into it

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_if_unused(directory: str | Path) -> bool:
    """Delete ``directory`` if it holds only what Hydra writes at startup (``.hydra/`` and an empty
    ``train.log``), then its parent if that is left empty (``outputs/<date>/``); True if removed.

    A run that stopped on a config error would otherwise leave a directory that looks like a run.
    Anything else in it (checkpoints, logs, a non-empty train.log) keeps it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return False
    entries = {p.name: p for p in directory.iterdir()}
    hydra_dir, log = entries.pop(".hydra", None), entries.pop("train.log", None)
    if entries or (log is not None and (not log.is_file() or log.stat().st_size)):
        return False
    if hydra_dir is not None:
        if not hydra_dir.is_dir() or any(p.suffix != ".yaml" or p.is_dir() for p in hydra_dir.iterdir()):
            return False
        for p in hydra_dir.iterdir():
            p.unlink()
        hydra_dir.rmdir()
    if log is not None:
        log.unlink()
    directory.rmdir()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", directory.parent.name):  # only Hydra's outputs/<date>/
        try:
            directory.parent.rmdir()
        except OSError:
            pass
    return True
