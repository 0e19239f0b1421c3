"""Optimizers and the learning-rate schedule.

``optim=adamw`` (:class:`OptimConfig`): AdamW with weight decay on matrices and embeddings.
``optim=muon`` (:class:`MuonConfig`): :class:`~mqa_lm.optim.muon.Muon` (batched, shared across ranks)
on every 2-D weight inside the transformer blocks and AdamW on the rest, stepped as one optimizer
(:class:`MuonAdamW`). Both: linear warmup, then cosine decay, one factor for every parameter group.

``config`` holds the validated settings and the schedule, ``muon`` the Muon optimizer, ``build`` what
turns a model and its settings into the optimizer and scheduler. Imports torch and
:mod:`mqa_lm.utils` only: the model and training code call in, never the reverse.
"""

from mqa_lm.optim.build import MuonAdamW, build_optimizer, build_scheduler, param_groups, split_parameters
from mqa_lm.optim.config import (
    DEFAULT_OPTIMIZER,
    MUON_ADJUST_LR,
    MUON_SHARDED_ERROR,
    OPTIMIZERS,
    MuonConfig,
    OptimConfig,
    default_optim_config,
    lr_at,
)
from mqa_lm.optim.muon import Muon, newton_schulz

__all__ = [
    "DEFAULT_OPTIMIZER",
    "MUON_ADJUST_LR",
    "MUON_SHARDED_ERROR",
    "OPTIMIZERS",
    "Muon",
    "MuonAdamW",
    "MuonConfig",
    "OptimConfig",
    "build_optimizer",
    "build_scheduler",
    "default_optim_config",
    "lr_at",
    "newton_schulz",
    "param_groups",
    "split_parameters",
]
