"""What ``python train.py`` does, as a function of the composed Hydra config (tests call it too).

validate (:func:`~mqa_lm.training.config.prepare_config`: one object per group, before Lightning's
import when train.py calls it) -> callbacks -> resume checkpoint -> datamodule -> prepare the data
(rank 0) and check the vocabulary -> Trainer -> module -> Trainer.fit -> report and sample.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from mqa_lm.data.tokenizer import EOT
from mqa_lm.model import MQATransformer
from mqa_lm.training.callbacks.tracking import log_resolved_config
from mqa_lm.training.checkpointing import (
    AtomicCheckpointIO,
    PreemptionCallback,
    checkpoint_header,
    resume_checkpoint,
    slurm_environment,
)
from mqa_lm.training.checkpointing.resume import _is_rank_zero
from mqa_lm.training.config import (  # importing it registers the _base nodes Hydra composes (config_store)
    SPECIAL_CKPT_PATHS,
    ConfigError,
    DataError,
    RunConfig,
    config_group,
    prepare_config,
)
from mqa_lm.training.console import quiet_known_noise
from mqa_lm.training.datamodule import TextDataModule
from mqa_lm.training.distributed import check_launch, full_model_state, global_batch_line, is_fully_sharded
from mqa_lm.training.init_from import InitSource, load_init_weights
from mqa_lm.training.loggers import ResumableCSVLogger
from mqa_lm.training.module import MQALitModule, check_vocab_fits
from mqa_lm.training.run_dir import RunDirLock, register_resolvers
from mqa_lm.utils.config import BadValueError, check_numbers, is_int

register_resolvers()  # ${run_id:} in configs/hydra/default.yaml

log = logging.getLogger("mqa_lm")


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


def locate(path: str) -> Any:
    """The object a ``_target_`` names (Hydra's ``get_object``), without Hydra's ERROR record of a
    name that does not import: the caller's one-line error says it, and a record in ``train.log``
    would keep the run directory of a run that never started."""
    logger = logging.getLogger("hydra.utils")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return get_object(path)
    finally:
        logger.setLevel(level)


def instantiate_group(cfg: DictConfig, group: str) -> list[Any]:
    """Every node of the config group ``group`` (``callbacks``, ``logger``) that names a ``_target_``,
    instantiated; a bad value is a :class:`ConfigError` naming ``group.<name>`` (a number given as
    text is caught from the class's annotations before the class sees it). A factory may return None
    to opt out (the progress bar when ``trainer.enable_progress_bar`` is false): it is dropped."""
    built = []
    for name, node in (cfg.get(group) or {}).items():
        if node is None or "_target_" not in node:
            continue
        try:
            target = locate(str(node["_target_"]))
        except (ImportError, ValueError):
            target = None  # instantiate() says what is wrong with the name
        key = f"{group}.{name}"
        try:
            if target is not None:
                check_numbers(target, OmegaConf.to_container(node, resolve=True), f"{key}.", True)  # type: ignore[arg-type]
            built.append(instantiate(node))
        except BadValueError as err:
            raise ConfigError(str(err)) from None
        except InstantiationException as err:
            cause = err.__cause__
            if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
                message = str(cause)
                raise ConfigError(message if f"{group}." in message else f"{key}: {message}") from None
            raise
    return [obj for obj in built if obj is not None]


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The ``callbacks`` group, instantiated (:func:`instantiate_group`)."""
    return instantiate_group(cfg, "callbacks")


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The ``logger`` group, instantiated (:func:`instantiate_group`)."""
    return instantiate_group(cfg, "logger")


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


def train(cfg: DictConfig, prepared: tuple[DictConfig, RunConfig, InitSource | None] | None = None) -> dict[str, float]:
    """Train as ``cfg`` says; returns the final callback metrics as floats. ``prepared``: what
    :func:`~mqa_lm.training.config.prepare_config` returned for ``cfg`` (train.py checks the config
    before it imports this module); None checks it here.

    The launching process holds the run directory's lock (:class:`~mqa_lm.training.run_dir.RunDirLock`) while it
    runs; ranks it starts, or that torchrun/srun start beside it, share the directory without it.
    """
    cfg, run, init_source = prepared or prepare_config(cfg)
    quiet_known_noise()
    if not _is_rank_zero():
        return _train(cfg, run, init_source)
    with RunDirLock(cfg.paths.output_dir):
        return _train(cfg, run, init_source)


def check_trainer_values(cfg: DictConfig) -> None:
    """The ``trainer`` group's numbers as its class (Lightning's Trainer) annotates them, before the
    data is prepared: Lightning reads some only inside ``fit()`` (``trainer.log_every_n_steps=x`` was
    a traceback from its fit loop); :class:`ConfigError` naming the key."""
    values = config_group(cfg, "trainer")
    try:
        target = locate(str(values.get("_target_", "lightning.pytorch.Trainer")))
    except (ImportError, ValueError):
        return  # instantiating it says what is wrong with the name
    try:
        check_numbers(target, values, "trainer.", True)
    except BadValueError as err:
        raise ConfigError(str(err)) from None


def _train(cfg: DictConfig, run: RunConfig, init_source: InitSource | None) -> dict[str, float]:
    check_trainer_values(cfg)
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    root_dir = cfg.trainer.get("default_root_dir") or cfg.paths.output_dir
    try:
        check_launch(cfg)
        # resume=auto: the newest valid checkpoint of the run's checkpoint dirs (hpc ones in root_dir).
        ckpt_path = resume_checkpoint(run.ckpt_path, run.resume, checkpoint_dirs(cfg, callbacks), [Path(str(root_dir))])
        resumed_step = check_resume_target(run, ckpt_path, cfg.trainer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        datamodule_class = locate(run.datamodule_target)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"data._target_={run.datamodule_target!r} is not an importable class ({err})") from None
    try:
        datamodule = datamodule_class(run.data)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if _local_rank() == 0:
        prepare_before_training(run, datamodule)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    trainer_cfg = config_group(cfg, "trainer")
    trainer_cfg["precision"] = resolve_precision(cfg.trainer)
    # Preemption requeues at a step boundary itself, so Lightning's SLURM requeue is switched off.
    ours: list[Any] = [AtomicCheckpointIO()]
    if any(isinstance(cb, PreemptionCallback) for cb in callbacks) and (env := slurm_environment()) is not None:
        ours.append(env)
    plugins = merge_plugins([instantiate(p) for p in trainer_cfg.pop("plugins", None) or []], ours)
    if resumed_step is not None:
        for lg in loggers:
            if isinstance(lg, ResumableCSVLogger):
                lg.resume_from_step(resumed_step)
    try:
        trainer: L.Trainer = instantiate(
            trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins, _convert_="partial"
        )
    except InstantiationException as err:
        # What _check_trainer leaves to Lightning (e.g. a float val_check_interval without epochs), and
        # an accelerator whose package is missing (trainer.accelerator=tpu: "Requirement 'torch_xla' ...").
        if isinstance(err.__cause__, (ValueError, TypeError, MisconfigurationException, ImportError)):
            raise ConfigError(f"trainer: {err.__cause__}") from None
        raise
    module_cfg = config_group(cfg, "module") or {"_target_": "mqa_lm.training.module.MQALitModule"}
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
