"""The run's config checked before Lightning is imported: :func:`prepare_config` (``init_from``
applied, then :func:`validate_config`: one validated object per group, a :class:`RunConfig`).

``train.py`` calls it first, so a bad value (``seed=abc``, ``model.d_model=-1``, ``optim.lr=x``,
``trainer.precision=17``...) is one ``config error:`` line after Hydra and torch load, not after
Lightning's import as well (~5 s on a 2-core CPU); :func:`mqa_lm.training.run.train` takes what it
returned. Nothing here imports Lightning (``tests/test_layering.py`` checks it), so the few facts it
needs from Lightning (its precision names) are written out and pinned to Lightning's by a test; the
checks that need Lightning's objects (callbacks, the Trainer) stay in :mod:`mqa_lm.training.run`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mqa_lm.data.config import DataConfig
from mqa_lm.inference import GenerationConfig
from mqa_lm.model import MQAConfig
from mqa_lm.optim import MUON_SHARDED_ERROR, MuonConfig, OptimConfig
from mqa_lm.training.config_store import DATAMODULE_TARGET
from mqa_lm.training.init_from import InitSource, apply_init_from
from mqa_lm.utils.config import check_int, is_int

# What Lightning's Trainer(precision=...) accepts: the values of lightning.fabric's _PRECISION_INPUT
# literals (tests/test_training.py checks this list against them).
PRECISION_VALUES = (
    "transformer-engine",
    "transformer-engine-float16",
    "16-true",
    "16-mixed",
    "bf16-true",
    "bf16-mixed",
    "32-true",
    "64-true",
    "64",
    "32",
    "16",
    "bf16",
)
# matmul_precision: what torch.set_float32_matmul_precision takes.
MATMUL_PRECISIONS = ("highest", "high", "medium")
# module.compile_scope: the whole forward as one graph, or each block on its own (MQALitModule).
COMPILE_SCOPES = ("model", "blocks")

RESUME_MODES = ("auto", "never")
# ckpt_path values Lightning resolves itself (they name no file). Lightning's "registry" is left out:
# it downloads from Lightning's model registry, which this project neither uses nor tests.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


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
    datamodule_target: str  # data._target_ (imported by train(): the default imports Lightning)
    sample: GenerationConfig  # the end-of-run sample (sample.max_new_tokens: 0 = none)
    sample_prompt: str
    compile: str | bool  # module.compile: "auto", True or False (see resolve_compile)
    ckpt_path: str | None
    resume: str


def check_ckpt_path(ckpt_path: str | None) -> None:
    """Raise ``ValueError`` unless ``ckpt_path`` is unset, a special name, or an existing path
    (a file, or a directory for FSDP's sharded checkpoints)."""
    if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS and not Path(ckpt_path).exists():
        raise ValueError(
            f"ckpt_path={ckpt_path!r} does not exist; point it at a checkpoint (e.g. <run>/checkpoints/last.ckpt) "
            f"or use one of {', '.join(SPECIAL_CKPT_PATHS)}"
        )


def check_resume_mode(resume: str | bool | None) -> str:
    """``resume`` as one of :data:`RESUME_MODES` (null/false mean never); ``ValueError`` otherwise."""
    mode = "never" if resume in (None, False) else str(resume)
    if mode not in RESUME_MODES:
        raise ValueError(f"resume={mode!r} is not one of {', '.join(RESUME_MODES)}; use resume=auto or resume=never")
    return mode


def _strategy_target(trainer_cfg: DictConfig) -> str:
    """``trainer.strategy`` as named in the composed config: a registry name (``ddp``, ``fsdp``), a
    ``_target_``, or the class name of a strategy object."""
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, str):
        return strategy
    if hasattr(strategy, "get"):
        return str(strategy.get("_target_", ""))
    return type(strategy).__name__


def flattens_parameters(trainer_cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` is Lightning's FSDPStrategy (FSDP1: each wrapped block's parameters
    flattened into one shard per rank), named by registry name (``fsdp...``) or class. ``trainer=fsdp``
    (:class:`~mqa_lm.training.distributed.FSDP2Strategy`) keeps every matrix a matrix, sharded by rows."""
    target = _strategy_target(trainer_cfg)
    if "." not in target and target.lower().startswith("fsdp"):  # Lightning's registry names for FSDPStrategy
        return True
    return target.rsplit(".", 1)[-1] == "FSDPStrategy"


STATE_DICT_TYPES = ("full", "sharded")


def check_fsdp_options(
    reshard_after_forward: Any = True,
    activation_checkpointing: Any = False,
    state_dict_type: Any = "full",
    cpu_offload: Any = False,
    sharding_strategy: Any = None,
) -> None:
    """Raise ValueError, naming the ``trainer.strategy`` key, for a value
    :class:`~mqa_lm.training.distributed.FSDP2Strategy` cannot take."""
    if sharding_strategy is not None:
        raise ValueError(
            f"trainer.strategy.sharding_strategy={sharding_strategy} is an option of FSDP1 (Lightning's FSDPStrategy), "
            "but trainer=fsdp runs FSDP2: use trainer.strategy.reshard_after_forward=true for FULL_SHARD (the default) "
            "or false for SHARD_GRAD_OP (NO_SHARD is trainer=ddp; HYBRID_SHARD is not offered), and drop "
            "sharding_strategy"
        )
    for key, value in (
        ("reshard_after_forward", reshard_after_forward),
        ("activation_checkpointing", activation_checkpointing),
        ("cpu_offload", cpu_offload),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"trainer.strategy.{key} must be true or false, got {value!r}")
    if state_dict_type not in STATE_DICT_TYPES:
        raise ValueError(f"trainer.strategy.state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")


def check_strategy(trainer_cfg: DictConfig) -> None:
    """Before any work: the ``trainer=fsdp`` options (:func:`check_fsdp_options`) as composed, and a
    Lightning ModelParallelStrategy named directly must not ask for tensor parallelism; ValueError."""
    strategy = trainer_cfg.get("strategy")
    name = _strategy_target(trainer_cfg).rsplit(".", 1)[-1]
    if not hasattr(strategy, "get"):
        return
    if name == "ModelParallelStrategy" and strategy.get("tensor_parallel_size", "auto") != 1:
        raise ValueError(
            f"trainer.strategy.tensor_parallel_size={strategy.get('tensor_parallel_size', 'auto')}: mqa-lm's model "
            "has no tensor parallelism, so Lightning's ModelParallelStrategy needs tensor_parallel_size=1 (its "
            "default, auto, is the processes per node); or use trainer=fsdp"
        )
    if name != "FSDP2Strategy":
        return
    check_fsdp_options(
        reshard_after_forward=strategy.get("reshard_after_forward", True),
        activation_checkpointing=strategy.get("activation_checkpointing", False),
        state_dict_type=strategy.get("state_dict_type", "full"),
        cpu_offload=strategy.get("cpu_offload", False),
        sharding_strategy=strategy.get("sharding_strategy"),
    )
    if strategy.get("cpu_offload") is True and str(trainer_cfg.get("accelerator", "auto")) == "cpu":
        raise ValueError(
            "trainer.strategy.cpu_offload=true keeps the shards in (pinned) CPU memory for a GPU to compute on, but "
            "trainer.accelerator=cpu has no GPU; set trainer.strategy.cpu_offload=false"
        )


def config_group(cfg: DictConfig, key: str) -> dict[str, Any]:
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
        model_fields = config_group(cfg, "model")
        vocab_from_data = model_fields.get("vocab_size") is None
        # vocab_size null is the tokenizer's size, known once the data is prepared: validate the rest
        # now with a stand-in (the module swaps in the real size and checks again).
        model = MQAConfig.from_dict({**model_fields, "vocab_size": 1} if vocab_from_data else model_fields)
        optim = OptimConfig.from_dict(config_group(cfg, "optim"))
        data_fields = config_group(cfg, "data")
        target = data_fields.pop("_target_", DATAMODULE_TARGET)
        data = DataConfig.from_dict(data_fields)
        sample_fields = config_group(cfg, "sample")
        sample_prompt = str(sample_fields.pop("prompt", "\n") or "\n")
        sample = GenerationConfig.from_dict(sample_fields, prefix="sample.")
        check_ckpt_path(cfg.get("ckpt_path"))
        resume = check_resume_mode(cfg.get("resume", "auto"))
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
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
    # torch only warns about another value, and the run goes on at its default precision.
    if cfg.get("matmul_precision") not in (None, *MATMUL_PRECISIONS):
        raise ConfigError(
            f"matmul_precision={cfg.get('matmul_precision')!r} is not one of {', '.join(MATMUL_PRECISIONS)} "
            "or null (torch.set_float32_matmul_precision); e.g. matmul_precision=high"
        )
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
        datamodule_target=str(target),
        sample=sample,
        sample_prompt=sample_prompt,
        compile=compile_setting,
        ckpt_path=str(ckpt_path) if ckpt_path else None,
        resume=resume,
    )


def prepare_config(cfg: DictConfig) -> tuple[DictConfig, RunConfig, InitSource | None]:
    """``cfg`` with ``init_from`` applied (a pretrained model's architecture and tokenizer), its
    validated groups, and the ``init_from`` source (None without one); :class:`ConfigError` otherwise."""
    try:
        cfg, init_source = apply_init_from(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    return cfg, validate_config(cfg), init_source
