"""The optimizer settings (``optim=adamw`` / ``optim=muon``) and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar, cast

from mqa_lm.utils.config import DictRoundTrip, check_int

C = TypeVar("C", bound="OptimConfig")

MUON_ADJUST_LR = ("original", "match_rms_adamw")

MUON_SHARDED_ERROR = (
    "optim=muon needs each weight matrix as a matrix (its Newton-Schulz step orthogonalises the whole "
    "matrix), but Lightning's FSDPStrategy (FSDP1) flattens each block's parameters into one shard; "
    "use trainer=fsdp (FSDP2, which shards each matrix by rows and works with Muon) or trainer=ddp, "
    "or keep this strategy with optim=adamw"
)


@dataclass
class OptimConfig(DictRoundTrip):
    """``optim=adamw``: AdamW + warmup/cosine settings, validated on construction (errors name ``optim.<field>``).

    ``decay_steps`` null means "the run's ``trainer.max_steps``"; after it the rate stays at the final
    rate, ``min_lr`` (null: a tenth of ``lr``, so that a command that lowers ``lr`` lowers both).
    :meth:`from_dict` picks the class from ``name`` (``adamw`` -> this class, ``muon`` -> :class:`MuonConfig`).
    """

    config_group: ClassVar[str] = "optim"
    key_prefix: ClassVar[str] = "optim."

    name: str = "adamw"
    # Measured on python train.py optim=adamw trainer.max_steps=800 (2-core CPU, 2026-12-01): 1e-3 / 1e-4
    # with 50 warmup steps reached val loss 4.3640 at step 800, 6e-4 / 6e-5 with 100 warmup steps 4.5783
    # (docs/benchmarks.md). Higher rates did better still there (5e-3: 3.9833) but this is also the rate of
    # every matrix of the large models FSDP trains, which want less (nanoGPT: 6e-4 for 124M).
    lr: float = 1e-3
    min_lr: float | None = None
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 50
    decay_steps: int | None = None
    fused: bool | None = None  # None: fused AdamW on CUDA, the loop implementation elsewhere

    def __post_init__(self) -> None:
        expected = _config_name(type(self))
        if self.name != expected:
            raise ValueError(
                f"optim.name={self.name!r} does not match {type(self).__name__} (optim.name={expected}); "
                "OptimConfig.from_dict picks the class from the name"
            )
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr={self.lr}] or null (lr / 10), got {self.min_lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        betas = list(self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        self.betas = [float(b) for b in betas]
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        check_int(self.warmup_steps, "optim.warmup_steps", minimum=0)
        check_int(
            self.decay_steps, "optim.decay_steps", none_ok=True, hint="null ends the schedule at trainer.max_steps"
        )
        if self.fused is not None and not isinstance(self.fused, bool):
            raise ValueError(f"optim.fused must be true, false or null, got {self.fused!r}")

    @property
    def final_lr(self) -> float:
        """The rate the cosine ends at: ``min_lr``, or a tenth of ``lr`` when it is null."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """The config of the optimizer ``values["name"]`` names (``adamw`` when absent, as in
        checkpoints written before ``optim=muon`` existed); unknown keys are an error naming them."""
        name = values.get("name", _config_name(cls))
        config_cls = OPTIMIZERS.get(name) if isinstance(name, str) else None
        if config_cls is None or not issubclass(config_cls, cls):
            valid = ", ".join(n for n, c in OPTIMIZERS.items() if issubclass(c, cls))
            raise ValueError(f"unknown optim.name {name!r}; valid choices are: {valid} (optim=<name>)")
        return cast(C, super(OptimConfig, config_cls).from_dict(values))


@dataclass
class MuonConfig(OptimConfig):
    """``optim=muon``: Muon on every 2-D weight inside the transformer blocks (attention Wqkv and out_proj,
    the MLP's projections); AdamW, set by the :class:`OptimConfig` fields (``lr``, ``weight_decay``,
    ``betas``, ``eps``, ``fused``), on everything else (embeddings, the LM head, norm gains, biases).

    One schedule scales both: every group's rate is its own peak times ``lr_at(step) / lr``, so the
    Muon rate warms up to ``muon_lr`` and decays to ``muon_lr * final_lr / lr`` (a tenth by default).

    Args:
        muon_lr: Muon's peak rate, before ``muon_adjust_lr`` scales it per matrix shape.
        muon_weight_decay: decoupled decay of the Muon matrices (each step multiplies them by
            ``1 - rate * muon_weight_decay``, with the scheduled, unadjusted rate).
        muon_momentum: Muon's momentum (an exponential average of the gradients).
        muon_nesterov: use the Nesterov form of that momentum.
        muon_ns_steps: Newton-Schulz iterations that orthogonalise each update.
        muon_adjust_lr: ``original`` scales the rate by ``sqrt(max(1, rows / cols))`` (Jordan et al.);
            ``match_rms_adamw`` by ``0.2 * sqrt(max(rows, cols))`` (Moonshot: AdamW's update size, so
            ``muon_lr`` near AdamW's rate).
    """

    name: str = "muon"
    # The AdamW part (embeddings, the tied LM head, gains, biases) takes a higher rate than AdamW on the
    # whole model: on python train.py, Muon 0.01 with AdamW 5e-3 reached 3.6479 at step 800, with 3e-3
    # 3.6730, with 2e-3 3.7292; muon_lr 0.02 with 2e-3: 3.7623, 0.05 with 1e-3: 4.3926 (docs/benchmarks.md).
    lr: float = 5e-3
    muon_lr: float = 0.01
    muon_weight_decay: float = 0.0
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.muon_lr > 0:
            raise ValueError(f"optim.muon_lr must be > 0, got {self.muon_lr}")
        if not self.muon_weight_decay >= 0:
            raise ValueError(f"optim.muon_weight_decay must be >= 0, got {self.muon_weight_decay}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not isinstance(self.muon_nesterov, bool):
            raise ValueError(f"optim.muon_nesterov must be true or false, got {self.muon_nesterov!r}")
        steps = self.muon_ns_steps
        check_int(steps, "optim.muon_ns_steps", maximum=99)  # torch.optim.Muon refuses 100 or more
        if self.muon_adjust_lr not in MUON_ADJUST_LR:
            raise ValueError(
                f"unknown optim.muon_adjust_lr {self.muon_adjust_lr!r}; valid choices are: {', '.join(MUON_ADJUST_LR)}"
            )


# optim.name -> its config class; configs/optim/<name>.yaml selects each (mqa_lm.training.config_store bases).
OPTIMIZERS: dict[str, type[OptimConfig]] = {"adamw": OptimConfig, "muon": MuonConfig}
# What MQALitModule(optim=None) trains with; configs/train.yaml picks the same option (a test checks).
# Muon: on python train.py it reached val loss 3.7571 in 600 steps and less time than AdamW's 4.3640 in
# 800 (docs/benchmarks.md, time to quality). trainer=fsdp (FSDP2) takes it too; Lightning's FSDPStrategy
# (FSDP1, flat shards) does not (MUON_SHARDED_ERROR).
DEFAULT_OPTIMIZER = "muon"


def default_optim_config() -> OptimConfig:
    """The optimizer settings of a run that names none: ``DEFAULT_OPTIMIZER`` at its defaults."""
    return OPTIMIZERS[DEFAULT_OPTIMIZER]()


def _config_name(config_cls: type[OptimConfig]) -> str:
    return next(str(f.default) for f in fields(config_cls) if f.name == "name")


def lr_at(step: int, cfg: OptimConfig, decay_steps: int) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup from lr/warmup, then cosine to the
    final rate (:attr:`OptimConfig.final_lr`)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    final = cfg.final_lr
    if step >= decay_steps:
        return final
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return final + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - final)
