"""The optimizers a run trains with, built from its :class:`~mqa_lm.optim.config.OptimConfig`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from mqa_lm.optim.config import MUON_SHARDED_ERROR, MuonConfig, OptimConfig, lr_at
from mqa_lm.optim.muon import Muon, run_closure


def split_parameters(model: nn.Module, muon: bool = False) -> dict[str, list[nn.Parameter]]:
    """Every trainable parameter exactly once (a tied weight once), by how it is optimised.

    ``muon``: the 2-D weights inside ``model.blocks`` (only when ``muon`` is set); ``decay``: the
    other tensors of 2 or more dimensions (embeddings, an untied LM head); ``no_decay``: norm gains
    and biases. Raises ValueError for Muon on a model wrapped by FSDP1 (flat shards); FSDP2's
    DTensor rows are fine (:class:`~mqa_lm.optim.muon.Muon` gathers each matrix).
    """
    muon_ids: set[int] = set()
    if muon:
        if _is_sharded(model):
            raise ValueError(MUON_SHARDED_ERROR)
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Module):
            raise ValueError(f"optim=muon trains the 2-D weights of model.blocks; {type(model).__name__} has none")
        muon_ids = {id(p) for p in blocks.parameters() if p.dim() == 2}
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "decay": [], "no_decay": []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = "muon" if id(p) in muon_ids else "decay" if p.dim() >= 2 else "no_decay"
        groups[role].append(p)
    return groups


def _is_sharded(model: nn.Module) -> bool:
    """FSDP1 (wrapped submodules) holds a slice of a flattened parameter per rank, not matrices."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: decay matrices and embeddings (dim >= 2); never biases or norm gains (dim < 2)."""
    groups = split_parameters(model)
    return [
        {"name": "decay", "params": groups["decay"], "weight_decay": weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0},
    ]


class MuonAdamW(torch.optim.Optimizer):
    """:class:`~mqa_lm.optim.muon.Muon` and ``torch.optim.AdamW`` stepped as one optimizer.

    Lightning's automatic optimization steps one optimizer with one closure, and one LR scheduler
    should drive every group; so this optimizer's ``param_groups`` are Muon's groups followed by
    AdamW's (the same dicts: a scheduler or LearningRateMonitor that sets or reads them acts on the
    inner optimizers), and its ``state`` is the one dict both inner optimizers write (their
    parameters are disjoint). ``state_dict``/``load_state_dict`` are therefore torch's own, over every
    group in order; loading re-links the inner optimizers to the loaded groups and state.

    ``step(closure)`` runs the closure once, then Muon's step and AdamW's. Gradient scalers see no
    fused step here (``_step_supports_amp_scaling`` stays False): they unscale every gradient first,
    which suits a fused AdamW inside too.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW) -> None:
        self.muon = muon
        self.adamw = adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self._link()

    def _link(self) -> None:
        n_muon = len(self.muon.param_groups)
        # Each optimizer's __setstate__, as its own load_state_dict would run it: fills group keys a
        # checkpoint from another torch version may lack.
        self.muon.__setstate__({"state": self.state, "param_groups": self.param_groups[:n_muon]})
        self.adamw.__setstate__({"state": self.state, "param_groups": self.param_groups[n_muon:]})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = run_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, grad_scaling: bool = False) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (``optim=adamw``), or :class:`MuonAdamW` (``optim=muon``).

    ``fused`` None picks the fused AdamW kernel on CUDA unless a GradScaler is in play (fp16), where
    gradients must be unscaled before clipping. Parameter groups carry a ``name`` (the learning-rate
    monitor logs ``lr-<optimizer>/<name>``).
    """
    on_cuda = next(model.parameters()).is_cuda
    fused = (on_cuda and not grad_scaling) if cfg.fused is None else cfg.fused
    # __post_init__ checked that betas holds exactly two numbers.
    betas = cast("tuple[float, float]", tuple(cfg.betas))
    if not isinstance(cfg, MuonConfig):
        return torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused
        )
    groups = split_parameters(model, muon=True)
    muon = Muon(
        [{"name": "muon", "params": groups["muon"]}],
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn=cfg.muon_adjust_lr,
    )
    adamw = torch.optim.AdamW(
        [
            {"name": "adamw_decay", "params": groups["decay"], "weight_decay": cfg.weight_decay},
            {"name": "adamw_no_decay", "params": groups["no_decay"], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=betas,
        eps=cfg.eps,
        fused=fused,
    )
    return MuonAdamW(muon, adamw)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, decay_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor gives :func:`lr_at` (every group: its own peak rate times the factor);
    step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, decay_steps) / cfg.lr)
