"""What ``python train.py`` does, as a function of the composed Hydra config (tests call it too).

validate -> datamodule -> module -> callbacks, loggers -> Trainer.fit -> report and sample.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mqa_lm.callbacks.tracking import log_resolved_config
from mqa_lm.distributed import check_launch, global_batch_line
from mqa_lm.fault_tolerance import fault_tolerance_callbacks, fault_tolerance_plugins, merge_plugins, resume_checkpoint
from mqa_lm.init_from import apply_init_from, load_init_weights
from mqa_lm.lit_module import MQALitModule
from mqa_lm.model import MQAConfig
from mqa_lm.optim import OptimConfig

log = logging.getLogger("mqa_lm")


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key and the fix."""


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


def validate_config(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the whole config before any work; return plain (model, optim) dicts.

    Raises :class:`ConfigError` with one message naming the offending key.
    """
    model_fields = OmegaConf.to_container(cfg.model, resolve=True)
    optim_fields = OmegaConf.to_container(cfg.optim, resolve=True)
    try:
        # vocab_size null is filled from the tokenizer later; validate the rest with a stand-in.
        MQAConfig.from_dict({**model_fields, "vocab_size": model_fields.get("vocab_size") or 1})
        OptimConfig.from_dict(optim_fields)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None

    block_size = cfg.data.get("block_size")
    if block_size is None or int(block_size) < 1:
        raise ConfigError(f"data.block_size must be a positive integer, got {block_size!r}")
    if int(block_size) > int(model_fields["max_seq_len"]):
        raise ConfigError(
            f"data.block_size={block_size} is longer than model.max_seq_len={model_fields['max_seq_len']}; "
            "lower data.block_size or raise model.max_seq_len"
        )
    max_steps = cfg.trainer.get("max_steps", -1)
    fast_dev_run = cfg.trainer.get("fast_dev_run", False)
    if not fast_dev_run and (max_steps is None or int(max_steps) < 1) and optim_fields.get("decay_steps") is None:
        raise ConfigError(f"trainer.max_steps must be a positive integer, got {max_steps!r}")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if int(accumulate) < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
    ckpt_path = cfg.get("ckpt_path")
    # A file, or a directory for FSDP's sharded checkpoints.
    if ckpt_path and ckpt_path not in ("last", "best", "hpc") and not Path(ckpt_path).exists():
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} does not exist; point it at a checkpoint (e.g. <run>/checkpoints/last.ckpt)"
        )
    sample = cfg.get("sample") or {}
    if int(sample.get("max_new_tokens", 0)) < 0:
        raise ConfigError(f"sample.max_new_tokens must be >= 0, got {sample.get('max_new_tokens')}")
    return model_fields, optim_fields


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    # A factory may return None to opt out (the progress bar when trainer.enable_progress_bar is false).
    built = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    return [cb for cb in built if cb is not None]


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None and "_target_" in lg]


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as ``cfg`` says; returns the final callback metrics as floats."""
    try:
        cfg, init_source = apply_init_from(cfg)  # init_from=...: a pretrained model's architecture and tokenizer
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    model_fields, optim_fields = validate_config(cfg)
    try:
        check_launch(cfg)
        ckpt_path = resume_checkpoint(cfg)  # resume=auto: the run directory's newest valid checkpoint
    except ValueError as err:
        raise ConfigError(str(err)) from None
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)

    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            raise ConfigError(str(cause)) from None
        raise
    module = MQALitModule(model=model_fields, optim=optim_fields, compile=cfg.get("compile", False))
    if init_source is not None and ckpt_path is None:  # a resumed run has its own weights
        load_init_weights(module.model, init_source)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(cfg.trainer)
    plugins = merge_plugins([instantiate(p) for p in trainer_cfg.pop("plugins", None) or []], fault_tolerance_plugins(cfg))
    trainer: L.Trainer = instantiate(
        trainer_cfg, callbacks=build_callbacks(cfg) + fault_tolerance_callbacks(cfg), logger=build_loggers(cfg) or False,
        plugins=plugins, _convert_="partial"
    )
    if trainer.is_global_zero:
        print(global_batch_line(trainer, datamodule), flush=True)
    log_resolved_config(trainer.loggers, cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        report(cfg, trainer, module, datamodule, metrics)
    return metrics


def report(cfg: DictConfig, trainer: L.Trainer, module: MQALitModule, datamodule: Any, metrics: dict[str, float]) -> None:
    """Print where the run's files are, its last metrics and a generated sample."""
    lines = [f"run directory: {cfg.paths.output_dir}"]
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "last_model_path", ""):
            lines.append(f"last checkpoint: {cb.last_model_path}")
        if getattr(cb, "best_model_path", "") and getattr(cb, "monitor", None) != "step":  # not the recovery ones
            lines.append(f"best checkpoint: {cb.best_model_path} (val/loss {float(cb.best_model_score or 0):.4f})")
    for lg in trainer.loggers:
        lines.append(f"{type(lg).__name__} logs: {lg.log_dir}")
    shown = {k: round(v, 4) for k, v in sorted(metrics.items())}
    lines.append(f"final metrics: {shown}")
    sample_cfg = cfg.get("sample") or {}
    max_new = int(sample_cfg.get("max_new_tokens", 0))
    if max_new > 0 and module.model is not None and hasattr(datamodule, "encode"):
        prompt_ids = datamodule.encode(sample_cfg.get("prompt") or "\n") or [0]
        # fit() hands the module back on the CPU; sample where and how it trained (device, autocast),
        # which also keeps CUDA-only kernels such as attn_impl=flash usable here.
        module.to(trainer.strategy.root_device)
        with trainer.precision_plugin.forward_context():
            ids = module.sample(prompt_ids, max_new, temperature=float(sample_cfg.get("temperature", 0.8)),
                                top_k=sample_cfg.get("top_k"), seed=int(cfg.seed))
        text = datamodule.decode(ids)
        sample_file = Path(cfg.paths.output_dir) / "sample.txt"
        sample_file.parent.mkdir(parents=True, exist_ok=True)
        sample_file.write_text(text, encoding="utf-8")
        lines.append(f"sample ({sample_file}):\n{'-' * 60}\n{text}\n{'-' * 60}")
    print("\n".join(lines), flush=True)
