"""Multi-device runs (``trainer=ddp|ddp_spawn|fsdp``): launch checks, the global-batch summary, and
``trainer=fsdp``: :class:`FSDP2Strategy` (Lightning's ModelParallelStrategy as plain FSDP2) with
:func:`shard_model`, which :meth:`MQALitModule.configure_model <mqa_lm.training.module.MQALitModule.configure_model>`
applies, and :func:`full_model_state`, the sharded weights gathered whole."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig
from torch import nn
from torch.optim import Optimizer

from mqa_lm.training.config import check_fsdp_options
from mqa_lm.utils.config import is_int

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# Strategies whose extra ranks Lightning starts by re-running the script (its subprocess launcher).
_SUBPROCESS_TARGETS = ("DDPStrategy", "FSDPStrategy", "FSDP2Strategy", "ModelParallelStrategy", "DeepSpeedStrategy")


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


# ---- trainer=fsdp: FSDP2 under Lightning's ModelParallelStrategy --------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """``trainer=fsdp``: Lightning's ModelParallelStrategy as plain FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Lightning's mesh is ``data_parallel x tensor_parallel``, by default nodes x processes per node (2-D
    parallelism); here every rank is data parallel, the mesh ``[world size, 1]``, set once the world
    size is known. The module applies the sharding in ``configure_model`` (:func:`shard_model` with
    :func:`shard_options`): each transformer block, then the root, before the first forward.

    Args:
        reshard_after_forward: free each block's gathered weights after its forward and gather them
            again for its backward (FSDP1's ``FULL_SHARD``); false keeps them until the backward
            (``SHARD_GRAD_OP``: less communication, more memory).
        activation_checkpointing: recompute every block's activations in the backward pass.
        state_dict_type: ``full`` (one checkpoint file, gathered on rank 0) or ``sharded`` (a
            directory of per-rank files, torch.distributed.checkpoint's format).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU (the optimizer
            steps there); on CUDA the process group then gets gloo for CPU tensors beside NCCL.
        sharding_strategy: FSDP1's option, refused with the one that replaces it.
        process_group_backend, timeout: as for Lightning's ModelParallelStrategy.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        state_dict_type: str = "full",
        cpu_offload: bool = False,
        sharding_strategy: str | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        check_fsdp_options(
            reshard_after_forward, activation_checkpointing, state_dict_type, cpu_offload, sharding_strategy
        )
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=state_dict_type == "sharded",
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.state_dict_type = state_dict_type
        self.cpu_offload = cpu_offload

    def setup_environment(self) -> None:
        # Known by now (the accelerator connector set the devices and nodes); Lightning builds the mesh.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def _get_process_group_backend(self) -> str:
        if self._process_group_backend is None and self.cpu_offload and self.root_device.type == "cuda":
            return "cuda:nccl,cpu:gloo"  # offloaded shards are CPU tensors (gradient norm, Muon's gathers)
        return super()._get_process_group_backend()

    def model_to_device(self) -> None:
        if not self.cpu_offload:  # fully_shard placed everything; .to() would pull offloaded shards back
            super().model_to_device()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """A full file as Lightning writes it (rank 0, through the trainer's CheckpointIO); a sharded
        directory written beside its place and swapped in once every rank's shard is down, so a save
        that stops halfway never leaves a directory that looks whole (Lightning writes the new shards
        over the old ones in place)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial.tmp")  # resume=auto reports leftovers of this pattern
        if self.is_global_zero and partial.exists():
            _remove(partial)
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every rank's shard, and rank 0's meta.pt, are written
        if self.is_global_zero:
            previous = path.with_name(f".{path.name}.previous.tmp")
            if path.exists():
                _remove(previous)
                path.rename(previous)
            partial.rename(path)
            _remove(previous)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded directory as Lightning loads it; a full file (ours, trainer=ddp's or one device's)
        through ``set_model_state_dict`` and ``set_optimizer_state_dict`` (broadcast from rank 0),
        which map the file's names onto the sharded module's, the optimizer's positions rekeyed to
        names by the optimizer's own groups. (Lightning's full-file loader looks each parameter up under
        the module's names, which ``activation_checkpointing``'s wrapper prefixes, and numbers the
        optimizer's parameters in ``model.parameters()`` order.)"""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_file():
            return super().load_checkpoint(path, weights_only=weights_only)
        assert self.model is not None and self.lightning_module is not None
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        options = StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=self.lightning_module.strict_loading
        )
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            if _keyed_by_position(state):
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
        return checkpoint

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Sharded: each rank's part, as Lightning saves it. Full (rank 0): keyed as the unsharded
        optimizer's own ``state_dict()`` is, by position in its parameter groups, so a full checkpoint
        resumes under trainer=ddp or one device as theirs resume here. (Lightning numbers the
        parameters in ``model.parameters()`` order, which is not the optimizer's order when its
        groups split the model, as Muon's and AdamW's decay groups do.)"""
        if self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        inner = cast(Optimizer, getattr(optimizer, "_optimizer", optimizer))  # a LightningOptimizer's own
        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, inner, options=options)
        if self.global_rank != 0:
            return state  # empty: rank 0 alone holds the full state
        return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model, optim=inner)

    def shard_kwargs(self) -> dict[str, Any]:
        """The strategy's own :func:`shard_model` options (the precision comes from the trainer)."""
        return {
            "reshard_after_forward": self.reshard_after_forward,
            "activation_checkpointing": self.activation_checkpointing,
            "cpu_offload": self.cpu_offload,
        }


def _keyed_by_position(optimizer_state: dict[str, Any]) -> bool:
    """Whether an optimizer state names its parameters by position (``optimizer.state_dict()``) rather
    than by name (``get_optimizer_state_dict``)."""
    first = next((p for group in optimizer_state.get("param_groups", []) for p in group["params"]), None)
    return isinstance(first, int)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def shard_options(trainer: L.Trainer) -> dict[str, Any]:
    """:func:`shard_model`'s keyword arguments for ``trainer``: its strategy's options
    (:class:`FSDP2Strategy`; defaults under a plain ModelParallelStrategy) and, under ``bf16-mixed``,
    weights gathered in bf16."""
    strategy = trainer.strategy
    options = strategy.shard_kwargs() if isinstance(strategy, FSDP2Strategy) else {}
    return {**options, "param_dtype": torch.bfloat16 if trainer.precision == "bf16-mixed" else None}


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel mesh to shard over: ``mesh`` itself, or Lightning's ``data_parallel``
    dimension; ValueError when Lightning's mesh asks for tensor parallelism, which the model lacks."""
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "data_parallel" not in names or any(mesh[n].size() > 1 for n in names if n != "data_parallel"):
        raise ValueError(
            f"the device mesh {dict(zip(names, mesh.shape))} asks for parallelism other than data parallel, which "
            "mqa-lm's model does not implement; use trainer=fsdp (data parallel over every rank), or pass "
            "ModelParallelStrategy(tensor_parallel_size=1)"
        )
    return mesh["data_parallel"]


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model``."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """FSDP2 on an :class:`~mqa_lm.model.MQATransformer` in place: ``fully_shard`` each of
    ``model.blocks`` (one all-gather and one reduce-scatter per block), then the root (embeddings,
    tied head, final norm), over the data-parallel dimension of ``mesh``. Returns ``model``.

    Call it once, before the first forward; a ``torch.compile`` wrapper made earlier traces lazily,
    so it compiles the sharded modules (Dynamo skips FSDP's hooks: its all-gathers and
    reduce-scatters run between the graphs). Parameter names and ``get_model_state_dict`` keys stay
    the unsharded model's.

    Args:
        mesh: a 1-D mesh, or Lightning's ``data_parallel x tensor_parallel`` mesh with tensor parallel 1.
        reshard_after_forward: see :class:`FSDP2Strategy`. The last block keeps its weights after
            the forward either way: the backward starts with it (as torchtitan does).
        activation_checkpointing: wrap each block in ``checkpoint_wrapper`` (non-reentrant) first.
        cpu_offload: ``CPUOffloadPolicy``: shards, gradients and the optimizer step on the CPU.
        param_dtype: the dtype the blocks' weights are gathered and computed in (bf16 under
            ``bf16-mixed``; None: as stored, fp32); their gradients are reduced in fp32. Block inputs
            are not cast (``cast_forward_inputs=False``) and the root keeps fp32, so the residual
            stream and an ALiBi bias stay fp32 and autocast decides each op's dtype, as without FSDP.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if is_fully_sharded(model):
        raise RuntimeError("the model is sharded already: shard_model() applies FSDP2 once")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"shard_model shards model.blocks one by one; {type(model).__name__} has no ModuleList blocks")
    dp_mesh = data_parallel_mesh(mesh)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    block_precision = MixedPrecisionPolicy(
        param_dtype=param_dtype,
        reduce_dtype=torch.float32 if param_dtype is not None else None,
        cast_forward_inputs=False,
    )
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(list(blocks)):
            blocks[i] = checkpoint_wrapper(block)  # state_dict keys unchanged (the wrapper strips its prefix)
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        fully_shard(
            block,
            mesh=dp_mesh,
            reshard_after_forward=reshard_after_forward and i < last,
            mp_policy=block_precision,
            offload_policy=offload,
        )
    fully_shard(model, mesh=dp_mesh, offload_policy=offload)  # the root keeps its weights until the backward
    return model


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole weights of an FSDP2-sharded ``model`` on global rank 0's CPU, keyed as the unsharded
    model's ``state_dict()`` (``get_model_state_dict`` drops checkpoint-wrapper and compile prefixes);
    None on the other ranks. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    return cast(dict[str, torch.Tensor], state)
