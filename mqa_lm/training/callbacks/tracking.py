"""Experiment tracking: the W&B logger (offline by itself when it cannot upload), run metadata,
and the resolved config with secrets scrubbed.

The W&B run id is kept in ``<run>/wandb_run_id.txt``, so a run continued or requeued in the same run
directory appends to the same W&B run (``resume="allow"``). The API key is never read into the
config: W&B takes it from ``WANDB_API_KEY`` or ``~/.netrc`` itself.
"""

from __future__ import annotations

import netrc
import os
import re
import secrets
import socket
import string
import subprocess
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mqa_lm.training.callbacks.wandb_artifacts import (
    CHECKPOINT_FILE,
    best_checkpoint,
    export_files,
    export_metadata,
    log_files,
)
from mqa_lm.training.module import trained_model

RUN_ID_FILE = "wandb_run_id.txt"
REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


# ---- secrets ------------------------------------------------------------------------------------


def _env_secrets() -> list[str]:
    """Values of environment variables whose names say they are secret (WANDB_API_KEY, HF_TOKEN...)."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def scrub_secrets(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``value`` (nested dicts/lists/strings) with secrets replaced by ``<redacted>``:
    any string holding the value of a secret-named environment variable, and any string under a
    secret-named key (``api_key``, ``token``, ...)."""
    secrets = _env_secrets() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            k: (
                REDACTED
                if isinstance(k, str) and _SECRET_NAME.search(k) and isinstance(v, str) and v
                else scrub_secrets(v, secrets)
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_secrets(v, secrets) for v in value)
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
    return value


def log_resolved_config(loggers: list[Any], cfg: DictConfig) -> None:
    """Log the whole resolved config (secrets scrubbed) as hyperparameters to every logger."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # an interpolation only the job can resolve: log it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    config = scrub_secrets(config)
    for logger in loggers:
        logger.log_hyperparams({"config": config})


# ---- W&B ----------------------------------------------------------------------------------------


def _api_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def has_credentials(host: str | None = None) -> bool:
    """Whether W&B can authenticate: ``WANDB_API_KEY`` or a ``~/.netrc`` (or ``$NETRC``) entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host or _api_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str | None) -> tuple[str | None, str]:
    """(mode for ``wandb.init``, why). ``None``/``auto``: ``WANDB_MODE`` if set, else online when
    there are credentials and the API host answers, else offline."""
    if mode not in (None, "auto"):
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb.mode must be online, offline, disabled or null (auto), got {mode!r}")
        return mode, f"mode={mode} from the config"
    if os.environ.get("WANDB_MODE"):
        return None, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    host = _api_host()
    if not has_credentials(host):
        return "offline", "no WANDB_API_KEY and no ~/.netrc entry"
    if not reachable(host):
        return "offline", f"{host} is not reachable"
    return None, "credentials found"


def stable_run_id(run_dir: str | os.PathLike) -> str | None:
    """The W&B run id of ``run_dir``, created on first use (rank 0) and reused after that."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    # Lightning sets rank_zero_only.rank at import; its annotations do not declare the attribute.
    if rank_zero_only.rank != 0:  # type: ignore[attr-defined]
        return None  # only rank 0 talks to W&B
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger with a stable run id, automatic offline mode and scrubbed configs.

    Args:
        save_dir: the run directory; W&B files go to ``<save_dir>/wandb``.
        project, entity, group, tags, name, job_type, notes: passed to ``wandb.init``.
        mode: ``online``, ``offline``, ``disabled`` or ``None`` (auto, see :func:`resolve_mode`).
        id: force a run id (default: the one stored in ``<save_dir>/wandb_run_id.txt``).
        log_model: ``True``: when training ends successfully, the best checkpoint (of the
            ``ModelCheckpoint`` that monitors a metric; recovery checkpoints are left out) goes up as
            artifact ``model-<run id>`` and the model export (``export_dir``) as ``pretrained-<run id>``.
            ``"all"``: Lightning's behaviour, every checkpoint as it is written. Offline runs keep the
            artifacts in the offline run directory until ``wandb sync``.
        export_dir: the run's model export (``<run>/model``, see ``callbacks.pretrained_export``);
            None or a directory without ``model.safetensors``: no export artifact.
    """

    def __init__(
        self,
        save_dir: str,
        project: str = "mqa-lm",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        job_type: str | None = "train",
        notes: str | None = None,
        mode: str | None = None,
        id: str | None = None,
        log_model: bool | Literal["all"] = False,
        export_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(log_model, bool) or log_model == "all"):
            raise ValueError(f"logger.wandb.log_model must be true, false or all, got {log_model!r}")
        resolved, self.mode_reason = resolve_mode(mode)
        extra: dict[str, Any] = {"mode": resolved} if resolved else {}
        # log_model=True is handled here (best checkpoint + export, offline too); Lightning keeps "all".
        super().__init__(
            name=name,
            save_dir=save_dir,
            id=id or stable_run_id(save_dir),
            project=project,
            log_model="all" if log_model == "all" else False,
            entity=entity,
            group=group,
            tags=list(tags or []),
            job_type=job_type,
            notes=notes,
            **extra,
            **kwargs,
        )
        self._log_best = log_model is True
        self.export_dir = Path(export_dir) if export_dir else None
        self._scored_checkpoint: ModelCheckpoint | None = None
        self._announced = False

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        run = super().experiment
        if not self._announced:
            self._announced = True
            print(f"W&B run {getattr(run, 'id', '?')} ({self.mode_reason}): {self.sync_hint() or 'online'}", flush=True)
        return run

    @property
    def log_dir(self) -> str | None:
        """The W&B run's own directory once it started, else the save directory."""
        run_dir = getattr(self._experiment, "dir", None)
        return str(Path(run_dir).parent) if run_dir else self.save_dir

    def sync_hint(self) -> str | None:
        """``wandb sync <dir>`` for an offline run (None when online or not started)."""
        run = self._experiment
        if run is None or getattr(run, "settings", None) is None:
            return None
        if run.settings.mode not in ("offline", "dryrun"):
            return None
        return f"wandb sync {Path(run.dir).parent}"

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        params = params if isinstance(params, dict) else vars(params)
        super().log_hyperparams(scrub_secrets(dict(params)))

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        # The callback that keeps the best model by a metric; RecoveryCheckpoint's "step" is no score.
        from mqa_lm.training.checkpointing import RecoveryCheckpoint

        if checkpoint_callback.monitor and not isinstance(checkpoint_callback, RecoveryCheckpoint):
            self._scored_checkpoint = checkpoint_callback
        super().after_save_checkpoint(checkpoint_callback)

    def log_run_artifacts(self) -> list[str]:
        """Log the best checkpoint and the model export as artifacts now; returns their names."""
        run = self.experiment
        logged = []
        checkpoint = None if self._scored_checkpoint is None else best_checkpoint(self._scored_checkpoint)
        if checkpoint is not None:
            path, aliases, metadata = checkpoint
            name = f"model-{run.id}"
            log_files(run, name, {CHECKPOINT_FILE: path}, metadata, aliases)
            logged.append(name)
        files = None if self.export_dir is None else export_files(self.export_dir)
        if files is not None:
            name = f"pretrained-{run.id}"
            metadata = export_metadata(files)
            if checkpoint is not None:
                metadata["score"] = checkpoint[2]["score"]
            log_files(run, name, files, metadata, ["best", "latest"])
            logged.append(name)
        return logged

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "success" and self._log_best and self._experiment is not None:
            names = self.log_run_artifacts()
            if names:
                print(f"W&B artifacts: {', '.join(names)}", flush=True)
        hint = self.sync_hint()
        if hint:
            print(f"W&B ran offline; upload it with: {hint}", flush=True)


# ---- run metadata -------------------------------------------------------------------------------


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """``HEAD`` of the checkout at ``path`` (``+dirty`` when it has uncommitted changes), or None."""
    cwd = Path(path or os.environ.get("PROJECT_ROOT") or ".")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class RunMetadata(L.Callback):
    """At the start of fitting, logs the parameter count, FLOPs per token and git commit as
    hyperparameters to every logger (rank 0)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = trained_model(pl_module)
        meta = {
            "num_params": model.num_params(),
            "num_params_non_embedding": model.num_params(non_embedding=True),
            "flops_per_token": model.flops_per_token(),
            "git_commit": git_commit() or "unknown",
        }
        for logger in trainer.loggers:
            logger.log_hyperparams(meta)
