"""What ``python train.py`` does, as a function of the composed Hydra config (tests call it too).

validate (one object per group) -> callbacks -> resume checkpoint -> datamodule -> prepare the data (rank 0)
and check the vocabulary -> Trainer -> module
-> Trainer.fit -> report and sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins.precision.precision import (
    _PRECISION_INPUT_INT,
    _PRECISION_INPUT_STR,
    _PRECISION_INPUT_STR_ALIAS,
)
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from mqa_lm.data.config import DataConfig
from mqa_lm.data.tokenizer import EOT
from mqa_lm.inference import GenerationConfig
from mqa_lm.model import MQAConfig, MQATransformer
from mqa_lm.optim import MUON_SHARDED_ERROR, MuonConfig, OptimConfig
from mqa_lm.training.callbacks.tracking import log_resolved_config
from mqa_lm.training.checkpointing import (
    SPECIAL_CKPT_PATHS,
    AtomicCheckpointIO,
    PreemptionCallback,
    check_ckpt_path,
    check_resume_mode,
    checkpoint_header,
    resume_checkpoint,
    slurm_environment,
)
from mqa_lm.training.checkpointing.resume import _is_rank_zero
from mqa_lm.training.config_store import DATAMODULE_TARGET  # importing it registers the _base nodes Hydra composes
from mqa_lm.training.console import quiet_known_noise
from mqa_lm.training.datamodule import TextDataModule
from mqa_lm.training.distributed import (
    check_launch,
    check_strategy,
    flattens_parameters,
    full_model_state,
    global_batch_line,
    is_fully_sharded,
)
from mqa_lm.training.init_from import InitSource, apply_init_from, load_init_weights
from mqa_lm.training.loggers import ResumableCSVLogger
from mqa_lm.training.module import COMPILE_SCOPES, MQALitModule, check_vocab_fits
from mqa_lm.training.run_dir import RunDirLock, register_resolvers
from mqa_lm.utils.config import check_int, is_int

register_resolvers()  # ${run_id:} in configs/hydra/default.yaml

log = logging.getLogger("mqa_lm")

# What Lightning's Trainer(precision=...) accepts (lightning.fabric.connector checks the same set).
PRECISION_VALUES = tuple(
    dict.fromkeys(
        str(v)
        for v in (
            *get_args(_PRECISION_INPUT_STR),
            *get_args(_PRECISION_INPUT_STR_ALIAS),
            *get_args(_PRECISION_INPUT_INT),
        )
    )
)


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key and the fix."""


class DataError(ValueError):
    """Sources that cannot be prepared (empty, not UTF-8, too short, a failed download); the message
    names the file or URL and the fix."""


@dataclass
class RunConfig:
    """The validated config of one run: one object per group, built once by :func:`validate_config`."""

    model: MQAConfig
    # model.vocab_size was null: `model` holds a stand-in and the tokenizer's size is used.
    vocab_from_data: bool
    optim: OptimConfig
    data: DataConfig
    datamodule_class: type
    sample: GenerationConfig  # the end-of-run sample (sample.max_new_tokens: 0 = none)
    sample_prompt: str
    compile: str | bool  # module.compile: "auto", True or False (see resolve_compile)
    ckpt_path: str | None
    resume: str


def resolve_precision(trainer_cfg: DictConfig) -> str | int:
    """``precision: auto`` means bf16-mixed on a CUDA GPU (where bf16 is supported), else 32-true."""
    precision = trainer_cfg.get("precision", "auto")
    if precision != "auto":
        return precision
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    wants_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "16-mixed" if wants_gpu and torch.cuda.is_available() else "32-true"


def resolve_compile(setting: str | bool, trainer: L.Trainer) -> bool:
    """``module.compile``: ``auto`` is on when ``trainer`` runs on CUDA, except under Lightning's own
    FSDPStrategy (FSDP1: Dynamo fails on its wrapped blocks, measured on 2x H200, torch 2.11); under
    ``trainer=fsdp`` (FSDP2) each block compiles after ``fully_shard`` wrapped it (``compile_scope``
    auto: blocks), as torchtitan does (ran on one H100, 2026-12-06); booleans force it."""
    if setting == "auto":
        from lightning.pytorch.strategies import FSDPStrategy

        return isinstance(trainer.accelerator, CUDAAccelerator) and not isinstance(trainer.strategy, FSDPStrategy)
    return bool(setting)


def resolve_compile_scope(scope: str, trainer: L.Trainer) -> str:
    """``module.compile_scope``: ``auto`` is ``blocks`` under a strategy that shards the model with
    FSDP2 (its all-gathers and reduce-scatters then run between the compiled graphs), else ``model``;
    the others are kept."""
    if scope != "auto":
        return scope
    from lightning.pytorch.strategies import ModelParallelStrategy

    return "blocks" if isinstance(trainer.strategy, ModelParallelStrategy) else "model"


def _group(cfg: DictConfig, key: str) -> dict[str, Any]:
    """A config group as a plain, resolved dict ({} when absent)."""
    node = cfg.get(key)
    values = {} if node is None else OmegaConf.to_container(node, resolve=True)
    if not isinstance(values, dict):
        raise ConfigError(f"{key} must be a mapping of settings, got {values!r}")
    return {str(k): v for k, v in values.items()}


def _check_trainer(trainer: DictConfig, optim: OptimConfig) -> None:
    """The trainer values the run's own logic depends on (Lightning checks the rest when it is built)."""
    max_steps = trainer.get("max_steps", -1)
    if max_steps is not None and not is_int(max_steps):
        raise ConfigError(f"trainer.max_steps must be an integer, got {max_steps!r}")
    # With no max_steps the cosine schedule needs optim.decay_steps to know where it ends.
    if not trainer.get("fast_dev_run", False) and (max_steps is None or max_steps < 1) and optim.decay_steps is None:
        raise ConfigError(f"trainer.max_steps must be a positive integer, got {max_steps!r}")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    try:
        check_int(accumulate, "trainer.accumulate_grad_batches")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # Lightning takes 0 (ZeroDivisionError at the first step) and only checks a float's range late.
    interval = trainer.get("val_check_interval", None)
    if (
        interval is not None
        and not isinstance(interval, (str, Mapping))
        and not ((is_int(interval) and interval >= 1) or (isinstance(interval, float) and 0 < interval <= 1))
    ):
        raise ConfigError(
            f"trainer.val_check_interval must be an integer >= 1 (steps between validations), a fraction in (0, 1] "
            f"or null, got {interval!r}; e.g. trainer.val_check_interval=100"
        )
    if isinstance(interval, float) and trainer.get("check_val_every_n_epoch", 1) is None:
        raise ConfigError(
            f"trainer.val_check_interval={interval} is a fraction of an epoch, but trainer.check_val_every_n_epoch "
            "is null (validation counted in steps); give a number of steps, e.g. trainer.val_check_interval=100"
        )
    # Lightning's own message names the value but not the key.
    precision = trainer.get("precision", "auto")
    valid = ("auto", *PRECISION_VALUES)
    if isinstance(precision, bool) or str(precision) not in valid:  # 16 and "16" are both accepted
        raise ConfigError(
            f"trainer.precision={precision!r} is not one of {', '.join(valid)}; e.g. trainer.precision=bf16-mixed"
        )


def validate_config(cfg: DictConfig) -> RunConfig:
    """Check the whole config before any work; return the validated groups as one :class:`RunConfig`.

    Raises :class:`ConfigError` with one message naming the offending key.
    """
    seed = cfg.get("seed")
    if not is_int(seed):
        raise ConfigError(f"seed must be an integer, got {seed!r}; e.g. seed=1337")
    try:
        model_fields = _group(cfg, "model")
        vocab_from_data = model_fields.get("vocab_size") is None
        # vocab_size null is the tokenizer's size, known once the data is prepared: validate the rest
        # now with a stand-in (the module swaps in the real size and checks again).
        model = MQAConfig.from_dict({**model_fields, "vocab_size": 1} if vocab_from_data else model_fields)
        optim = OptimConfig.from_dict(_group(cfg, "optim"))
        data_fields = _group(cfg, "data")
        target = data_fields.pop("_target_", DATAMODULE_TARGET)
        data = DataConfig.from_dict(data_fields)
        sample_fields = _group(cfg, "sample")
        sample_prompt = str(sample_fields.pop("prompt", "\n") or "\n")
        sample = GenerationConfig.from_dict(sample_fields, prefix="sample.")
        check_ckpt_path(cfg.get("ckpt_path"))
        resume = check_resume_mode(cfg.get("resume", "auto"))
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    try:
        datamodule_class = get_class(target)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"data._target_={target!r} is not an importable class ({err})") from None

    if data.block_size > model.max_seq_len:
        raise ConfigError(
            f"data.block_size={data.block_size} is longer than model.max_seq_len={model.max_seq_len}; "
            "lower data.block_size or raise model.max_seq_len"
        )
    _check_trainer(cfg.trainer, optim)
    try:
        check_strategy(cfg.trainer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if isinstance(optim, MuonConfig) and flattens_parameters(cfg.trainer):
        raise ConfigError(MUON_SHARDED_ERROR)
    compile_setting = (cfg.get("module") or {}).get("compile", False)
    if not (isinstance(compile_setting, bool) or compile_setting == "auto"):
        raise ConfigError(f"module.compile must be auto, true or false, got {compile_setting!r}")
    scope = (cfg.get("module") or {}).get("compile_scope", "model")
    if scope not in ("auto", *COMPILE_SCOPES):
        raise ConfigError(f"module.compile_scope must be one of auto, {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    ckpt_path = cfg.get("ckpt_path")
    return RunConfig(
        model=model,
        vocab_from_data=vocab_from_data,
        optim=optim,
        data=data,
        datamodule_class=datamodule_class,
        sample=sample,
        sample_prompt=sample_prompt,
        compile=compile_setting,
        ckpt_path=str(ckpt_path) if ckpt_path else None,
        resume=resume,
    )


def check_resume_target(run: RunConfig, ckpt_path: str | None, trainer: DictConfig) -> int | None:
    """Before any work: the checkpoint a run continues from must have steps left to train and the
    command's model architecture (:meth:`MQAConfig.resume_differences`); :class:`ConfigError` otherwise.
    Returns the checkpoint's step (None for a fresh run or a name Lightning resolves)."""
    if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS:
        return None
    step, hparams = checkpoint_header(ckpt_path)
    max_steps = trainer.get("max_steps", -1)
    if not trainer.get("fast_dev_run", False) and is_int(max_steps) and max_steps > 0 and step >= max_steps:
        where = "already at" if step == max_steps else "already past"
        raise ConfigError(
            f"the checkpoint {ckpt_path} is at step {step}, {where} trainer.max_steps={max_steps}, so nothing "
            f"would be trained; raise trainer.max_steps above {step} to continue it, or start fresh "
            "(resume=never, or another hydra.run.dir)"
        )
    saved_optim = hparams.get("optim")
    # An optimizer's state only loads into the same kind of optimizer (Lightning would fail on the
    # parameter groups' count, naming neither optimizer).
    if isinstance(saved_optim, dict) and saved_optim.get("name", "adamw") != run.optim.name:
        before = saved_optim.get("name", "adamw")
        raise ConfigError(
            f"the checkpoint {ckpt_path} was trained with optim={before}; this command has optim={run.optim.name}; "
            f"use optim={before} to continue it, or start a new run (resume=never, or another hydra.run.dir)"
        )
    saved = hparams.get("model")
    if not isinstance(saved, dict):
        return step
    diffs = run.model.resume_differences(saved, ignore=("vocab_size",) if run.vocab_from_data else ())
    if diffs:
        then = ", ".join(f"model.{name}={before}" for name, before, _ in diffs)
        now = ", ".join(f"model.{name}={after}" for name, _, after in diffs)
        raise ConfigError(
            f"the checkpoint {ckpt_path} was trained with {then}; this command has {now}; use the "
            "checkpoint's values to continue it, or start a new run (resume=never, or another hydra.run.dir)"
        )
    return step


def _local_rank() -> int:
    """This process's rank on its node as a launcher set it (torchrun, Lightning's DDP, srun); 0 alone."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def prepare_before_training(run: RunConfig, datamodule: Any) -> None:
    """Prepare the data (local rank 0, as Lightning would) before the Trainer exists, so that a bad
    source is one :class:`DataError` before any other work and the vocabulary can be checked.

    Lightning's own ``prepare_data`` call in ``fit`` then finds the data current and does nothing. The
    token files are opened (``setup``) here too: a directory that is gone is a :class:`DataError` now,
    and from here on the run reads the files through their maps, wherever the directory goes.
    """
    try:
        datamodule.prepare_data()
        if isinstance(datamodule, TextDataModule):  # whose setup Lightning may call again (it returns at once)
            datamodule.setup("fit")
    except ValueError as err:
        message = str(err)
        raise DataError(message.removeprefix("data: ")) from None
    vocab = getattr(datamodule, "vocab_size", None)
    if not run.vocab_from_data and isinstance(vocab, int):
        try:
            check_vocab_fits(run.model.vocab_size, vocab)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The ``callbacks`` group, instantiated; a bad value is a :class:`ConfigError` naming the callback."""
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        try:
            built.append(instantiate(node))
        except InstantiationException as err:
            cause = err.__cause__
            if isinstance(cause, (ValueError, TypeError)):
                message = str(cause)
                raise ConfigError(message if "callbacks." in message else f"callbacks.{name}: {message}") from None
            raise
    # A factory may return None to opt out (the progress bar when trainer.enable_progress_bar is false).
    return [cb for cb in built if cb is not None]


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None and "_target_" in lg]


def checkpoint_dirs(cfg: DictConfig, callbacks: list[L.Callback]) -> list[Path]:
    """Where resume=auto looks for ``*.ckpt``: ``paths.checkpoint_dir`` and every ModelCheckpoint's dirpath."""
    dirs = [cfg.paths.get("checkpoint_dir")] + [cb.dirpath for cb in callbacks if isinstance(cb, ModelCheckpoint)]
    unique: dict[Path, None] = {}
    for d in dirs:
        if d:
            unique[Path(str(d)).expanduser().resolve()] = None
    return list(unique)


def merge_plugins(own: list[Any], extra: list[Any]) -> list[Any]:
    """The trainer's own (instantiated) ``plugins`` plus ``extra``; the user's CheckpointIO or cluster
    environment wins over ours of the same kind."""
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment

    kinds = (CheckpointIO, ClusterEnvironment)
    taken = {k for k in kinds for p in own if isinstance(p, k)}
    return list(own) + [p for p in extra if not any(isinstance(p, k) for k in taken)]


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as ``cfg`` says; returns the final callback metrics as floats.

    The launching process holds the run directory's lock (:class:`~mqa_lm.training.run_dir.RunDirLock`) while it
    runs; ranks it starts, or that torchrun/srun start beside it, share the directory without it.
    """
    try:
        cfg, init_source = apply_init_from(cfg)  # init_from=...: a pretrained model's architecture and tokenizer
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    run = validate_config(cfg)
    quiet_known_noise()
    if not _is_rank_zero():
        return _train(cfg, run, init_source)
    with RunDirLock(cfg.paths.output_dir):
        return _train(cfg, run, init_source)


def _train(cfg: DictConfig, run: RunConfig, init_source: InitSource | None) -> dict[str, float]:
    callbacks = build_callbacks(cfg)
    root_dir = cfg.trainer.get("default_root_dir") or cfg.paths.output_dir
    try:
        check_launch(cfg)
        # resume=auto: the newest valid checkpoint of the run's checkpoint dirs (hpc ones in root_dir).
        ckpt_path = resume_checkpoint(run.ckpt_path, run.resume, checkpoint_dirs(cfg, callbacks), [Path(str(root_dir))])
        resumed_step = check_resume_target(run, ckpt_path, cfg.trainer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        datamodule = run.datamodule_class(run.data)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if _local_rank() == 0:
        prepare_before_training(run, datamodule)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    trainer_cfg = _group(cfg, "trainer")
    trainer_cfg["precision"] = resolve_precision(cfg.trainer)
    # Preemption requeues at a step boundary itself, so Lightning's SLURM requeue is switched off.
    ours: list[Any] = [AtomicCheckpointIO()]
    if any(isinstance(cb, PreemptionCallback) for cb in callbacks) and (env := slurm_environment()) is not None:
        ours.append(env)
    plugins = merge_plugins([instantiate(p) for p in trainer_cfg.pop("plugins", None) or []], ours)
    loggers = build_loggers(cfg)
    if resumed_step is not None:
        for lg in loggers:
            if isinstance(lg, ResumableCSVLogger):
                lg.resume_from_step(resumed_step)
    try:
        trainer: L.Trainer = instantiate(
            trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins, _convert_="partial"
        )
    except InstantiationException as err:
        # What _check_trainer leaves to Lightning (e.g. a float val_check_interval without epochs).
        if isinstance(err.__cause__, (ValueError, TypeError, MisconfigurationException)):
            raise ConfigError(f"trainer: {err.__cause__}") from None
        raise
    module_cfg = _group(cfg, "module") or {"_target_": "mqa_lm.training.module.MQALitModule"}
    module_cfg.pop("compile", None)
    if "compile_scope" in module_cfg:
        module_cfg["compile_scope"] = resolve_compile_scope(module_cfg["compile_scope"], trainer)
    module = instantiate(module_cfg, _partial_=True)(
        model=run.model,
        optim=run.optim,
        compile=resolve_compile(run.compile, trainer),
        vocab_from_data=run.vocab_from_data,
    )
    if init_source is not None and ckpt_path is None:  # a resumed run has its own weights
        load_init_weights(module.model, init_source)
    if trainer.is_global_zero:
        print(global_batch_line(trainer, datamodule), flush=True)
    log_resolved_config(trainer.loggers, cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    sampler = module
    if run.sample.max_new_tokens > 0 and module.model is not None and is_fully_sharded(module.model):
        # Rank 0 alone cannot run the sharded model: every rank gathers the weights, rank 0 samples.
        state = full_model_state(module.model)
        if state is not None:
            sampler = MQALitModule(model=module.config, optim=module.optim_config)
            cast(MQATransformer, sampler.model).load_state_dict(state)
    if trainer.is_global_zero:
        report(cfg, run, trainer, sampler, datamodule, metrics)
    return metrics


def report(
    cfg: DictConfig,
    run: RunConfig,
    trainer: L.Trainer,
    module: MQALitModule,
    datamodule: Any,
    metrics: dict[str, float],
) -> None:
    """Print where the run's files are, its last metrics and a generated sample."""
    lines = [f"run directory: {cfg.paths.output_dir}"]
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.last_model_path:
            lines.append(f"last checkpoint: {cb.last_model_path}")
        # Not the recovery ones (monitor=step); and a best with no computed score is not reported.
        score = cb.best_model_score
        if cb.best_model_path and cb.monitor != "step" and score is not None:
            lines.append(f"best checkpoint: {cb.best_model_path} ({cb.monitor} {float(score):.4f})")
    for lg in trainer.loggers:
        lines.append(f"{type(lg).__name__} logs: {lg.log_dir}")
    shown = {k: round(v, 4) for k, v in sorted(metrics.items())}
    lines.append(f"final metrics: {shown}")
    sample = run.sample
    if sample.max_new_tokens > 0 and module.model is not None and hasattr(datamodule, "encode"):
        prompt_ids = datamodule.encode(run.sample_prompt) or [0]
        # fit() hands the module back on the CPU; sample where and how it trained (device, autocast),
        # which also keeps CUDA-only kernels such as attn_impl=flash usable here.
        module.to(trainer.strategy.root_device)
        with trainer.precision_plugin.forward_context():
            tokenizer = getattr(datamodule, "tokenizer", None)
            eos = tokenizer.token_to_id(EOT) if tokenizer is not None else None
            ids = module.sample(prompt_ids, sample, eos_token_id=eos)
        text = datamodule.decode(ids)
        sample_file = Path(cfg.paths.output_dir) / "sample.txt"
        sample_file.parent.mkdir(parents=True, exist_ok=True)
        sample_file.write_text(text, encoding="utf-8")
        lines.append(f"sample ({sample_file}):\n{'-' * 60}\n{text}\n{'-' * 60}")
    if module.model is not None:
        lines.append(
            f"sample more: python generate.py ckpt_path={cfg.paths.output_dir} prompt='...' max_new_tokens=200"
        )
    print("\n".join(lines), flush=True)
