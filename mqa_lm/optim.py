"""Optimizer and learning-rate schedule: AdamW with weight-decay groups, linear warmup, cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn

from mqa_lm.config_fields import DictRoundTrip


@dataclass
class OptimConfig(DictRoundTrip):
    """AdamW + warmup/cosine settings, validated on construction (errors name ``optim.<field>``).

    ``decay_steps`` null means "the run's ``trainer.max_steps``"; after it the rate stays ``min_lr``.
    """

    config_group: ClassVar[str] = "optim"

    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None
    fused: bool | None = None  # None: fused AdamW on CUDA, the loop implementation elsewhere

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        betas = list(self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        self.betas = [float(b) for b in betas]
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"optim.decay_steps must be >= 1 (or null for trainer.max_steps), got {self.decay_steps}")


def lr_at(step: int, cfg: OptimConfig, decay_steps: int) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup from lr/warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings (dim >= 2); never biases or norm gains (dim < 2)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, grad_scaling: bool = False) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. ``fused`` None picks the fused kernel on CUDA unless a
    GradScaler is in play (fp16), where gradients must be unscaled before clipping."""
    on_cuda = next(model.parameters()).is_cuda
    fused = (on_cuda and not grad_scaling) if cfg.fused is None else cfg.fused
    # __post_init__ checked that betas holds exactly two numbers.
    betas = cast("tuple[float, float]", tuple(cfg.betas))
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, decay_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor gives :func:`lr_at`; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, decay_steps) / cfg.lr)
