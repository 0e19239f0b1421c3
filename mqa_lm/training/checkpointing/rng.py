"""Exact resume of the random streams: torch, CUDA, numpy and Python RNG states per optimizer step."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """torch, CUDA (current device), numpy and Python random states as weights-only-safe values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (a saved CUDA state is skipped on a machine without CUDA)."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGStateCallback(L.Callback):
    """Makes the random streams a function of the optimizer step, and saves them in checkpoints.

    The state is captured when an optimizer step completes and put back when the next step's first
    micro-batch starts, so whatever draws in between (a validation DataLoader's iterator, a new
    epoch's iterator, a checkpoint save) leaves training untouched, and a run resumed from a
    checkpoint of step ``k`` continues from exactly the state the uninterrupted run had after step
    ``k``. Every rank restores the state rank 0 saved: ranks are seeded alike by ``seed_everything``.
    """

    def __init__(self) -> None:
        self._boundary: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._step_seen: int | None = None
        self._restore_next = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_seen = trainer.global_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            self._boundary, self._pending = self._pending, None
            self._restore_next = True
        if self._restore_next and self._boundary is not None:
            restore_rng_state(self._boundary)
        self._restore_next = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._step_seen:  # this micro-batch completed an optimizer step
            self._step_seen = trainer.global_step
            self._boundary = capture_rng_state()
            self._restore_next = True

    def state_dict(self) -> dict[str, Any]:
        return {} if self._boundary is None else {"rng": self._boundary}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")
