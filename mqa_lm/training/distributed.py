"""Launch checks and the global-batch summary for multi-device runs (``trainer=ddp|ddp_spawn|fsdp``)."""

from __future__ import annotations

from typing import Any, Literal, cast

import lightning as L
import torch
from omegaconf import DictConfig

from mqa_lm.utils.config import is_int

# Strategies whose extra ranks Lightning starts by re-running the script (its subprocess launcher).
_SUBPROCESS_TARGETS = ("DDPStrategy", "FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def _device_count(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        accelerator = str(trainer_cfg.get("accelerator", "auto"))
        return torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.lstrip("-").isdigit() else 1


def _starts_subprocesses(trainer_cfg: DictConfig) -> bool:
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, str):
        name = strategy.lower()
        return name.startswith(("ddp", "fsdp", "deepspeed")) and "spawn" not in name and "fork" not in name
    target = str(strategy.get("_target_", "")) if hasattr(strategy, "get") else type(strategy).__name__
    start_method = str(strategy.get("start_method", "popen")) if hasattr(strategy, "get") else "popen"
    return target.endswith(_SUBPROCESS_TARGETS) and start_method == "popen"


def shards_parameters(trainer_cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` is FSDP or Lightning's ModelParallelStrategy (FSDP2, tensor
    parallel), whose wrapped parameters are slices of the model's, as named in the composed config."""
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, str):
        name = strategy.lower()
    elif hasattr(strategy, "get"):
        name = str(strategy.get("_target_", "")).lower()
    else:
        name = type(strategy).__name__.lower()
    return "fsdp" in name or "modelparallel" in name


def check_launch(cfg: DictConfig) -> None:
    """Refuse launch combinations that cannot work, before any work; raises ValueError.

    * a local ``-m`` sweep (Hydra's basic launcher) with a strategy that re-executes ``train.py``
      per rank: every re-executed rank would start the whole sweep again;
    * ``hydra/launcher=slurm`` with a ``trainer.devices`` that is not a count (submitit needs
      ``tasks_per_node = gpus_per_node = trainer.devices``).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    # Typed as the HydraConf dataclass, but at run time the DictConfig built from it.
    hydra_cfg = cast(DictConfig, HydraConfig.get())
    launcher = str((hydra_cfg.get("launcher") or {}).get("_target_", ""))
    if "submitit" in launcher.lower():
        devices = cfg.trainer.get("devices")
        if not is_int(devices) or devices < 1:
            raise ValueError(
                f"hydra/launcher=slurm starts trainer.devices tasks per node, but trainer.devices={devices!r}; "
                "set it to the GPUs per node, e.g. trainer.devices=8"
            )
    if hydra_cfg.mode == RunMode.MULTIRUN and launcher.endswith("BasicLauncher"):
        if _starts_subprocesses(cfg.trainer) and _device_count(cfg.trainer) > 1:
            strategy = cfg.trainer.get("strategy")
            name = strategy if isinstance(strategy, str) else strategy.get("_target_")
            raise ValueError(
                f"a local -m sweep cannot use trainer.strategy={name} on {_device_count(cfg.trainer)} devices: "
                "Lightning starts the extra ranks by re-running train.py, which would re-run the whole sweep. "
                "Use trainer=ddp_spawn for local sweeps, or a launcher that starts one process per device "
                "(hydra/launcher=slurm, or torchrun for a single run)"
            )


def global_batch(trainer: L.Trainer, datamodule: Any) -> dict[str, int]:
    """Micro-batch x accumulation x world size, in sequences and tokens per optimizer step."""
    micro = int(datamodule.batch_size)
    accumulate = int(trainer.accumulate_grad_batches)
    world = int(trainer.world_size)
    sequences = micro * accumulate * world
    return {
        "micro_batch": micro,
        "accumulate": accumulate,
        "world_size": world,
        "sequences": sequences,
        "tokens": sequences * int(datamodule.block_size),
    }


def global_batch_line(trainer: L.Trainer, datamodule: Any) -> str:
    g = global_batch(trainer, datamodule)
    return (
        f"global batch: {g['micro_batch']} (micro-batch) x {g['accumulate']} (accumulation) x "
        f"{g['world_size']} (world size) = {g['sequences']} sequences = {g['tokens']:,} tokens per step"
    )


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    state_dict_type: str = "full",
    cpu_offload: bool = False,
    **kwargs: Any,
) -> Any:
    """Lightning's FSDPStrategy wrapping each :class:`mqa_lm.model.Block` as one FSDP unit.

    Args:
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` or ``NO_SHARD``.
        activation_checkpointing: recompute every block's activations in the backward pass.
        state_dict_type: ``full`` (one file, gathered on rank 0) or ``sharded`` (a directory).
        cpu_offload: keep sharded parameters on the CPU between uses.
        kwargs: passed to ``FSDPStrategy`` (e.g. ``limit_all_gathers``).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    from mqa_lm.model import Block

    if state_dict_type not in ("full", "sharded"):
        raise ValueError(f"trainer.strategy.state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
    return FSDPStrategy(
        # Lightning annotates the four upper-case names but looks up any case of them.
        sharding_strategy=sharding_strategy,  # type: ignore[arg-type]
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        state_dict_type=cast(Literal["full", "sharded"], state_dict_type),  # checked just above
        cpu_offload=cpu_offload,
        **kwargs,
    )
