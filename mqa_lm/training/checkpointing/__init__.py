"""Checkpointing and fault tolerance (README "Scaling out and resuming").

* :mod:`~mqa_lm.training.checkpointing.io`: atomic checkpoint writes, verification, corrupt/unsafe errors.
* :mod:`~mqa_lm.training.checkpointing.resume`: which checkpoint a run starts from (``ckpt_path``, ``resume``).
* :mod:`~mqa_lm.training.checkpointing.rng`: random states saved at optimizer steps (exact resume).
* :mod:`~mqa_lm.training.checkpointing.preemption`: signals -> checkpoint at a step boundary, requeue, exit.

The callbacks are configured in ``configs/callbacks/`` (``rng_state``, ``preemption``).
"""

from mqa_lm.training.checkpointing.io import (
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    atomic_torch_save,
    next_hpc_path,
    verify_checkpoint,
)
from mqa_lm.training.checkpointing.last import LastAndBestCheckpoint
from mqa_lm.training.checkpointing.preemption import (
    DEFAULT_REQUEUE_SIGNALS,
    DEFAULT_SIGNALS,
    Preempted,
    PreemptionCallback,
    slurm_environment,
)
from mqa_lm.training.checkpointing.recovery import RecoveryCheckpoint
from mqa_lm.training.checkpointing.resume import checkpoint_header, find_resume_checkpoint, resume_checkpoint
from mqa_lm.training.checkpointing.rng import RNGStateCallback, capture_rng_state, restore_rng_state
from mqa_lm.training.config import RESUME_MODES, SPECIAL_CKPT_PATHS, check_ckpt_path, check_resume_mode

__all__ = [
    "DEFAULT_REQUEUE_SIGNALS",
    "DEFAULT_SIGNALS",
    "RESUME_MODES",
    "SPECIAL_CKPT_PATHS",
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "LastAndBestCheckpoint",
    "Preempted",
    "PreemptionCallback",
    "RNGStateCallback",
    "RecoveryCheckpoint",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "capture_rng_state",
    "check_ckpt_path",
    "check_resume_mode",
    "checkpoint_header",
    "find_resume_checkpoint",
    "next_hpc_path",
    "restore_rng_state",
    "resume_checkpoint",
    "slurm_environment",
    "verify_checkpoint",
]
