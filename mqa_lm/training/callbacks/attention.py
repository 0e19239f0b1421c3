"""What the attention does during training: maps as pictures, and per-head instability signals.

Every ``every_n_steps`` optimizer steps (and once at the end of training) one fixed validation window
goes through the model on the reference attention path (``MQATransformer.attention_probe``: a single
small forward, no grad, eval mode). Per layer and query head it logs

- ``attention/entropy/lLLhHH``: mean entropy (nats) of the query rows' distributions;
- ``attention/max_logit/lLLhHH``: the largest pre-softmax logit, the quantity whose growth
  ``qk_ln`` and ``clip_qkv`` exist to prevent;
- ``attention/sink/lLLhHH``: mean share of attention on the first token (attention sink);

to every logger as scalars, and the maps as heatmaps: W&B images, TensorBoard images and PNG files
under ``<run>/attention/step_<N>/``. ``attention/log_seconds`` is the wall time of each such call,
so the cost of this callback can be read from the logs.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from mqa_lm.training.callbacks.heatmap import HeatmapRenderer
from mqa_lm.training.module import trained_model
from mqa_lm.utils.config import check_int


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each query row of ``weights`` [..., queries, keys] -> [..., queries]
    (0 * log 0 taken as 0)."""
    p = weights.double()
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim=-1)


def attention_stats(weights: torch.Tensor, max_logit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head statistics of one layer, each a float64 tensor [heads].

    ``weights`` [batch, heads, queries, keys] are causal self-attention weights of a window;
    ``max_logit`` [batch, heads] the largest pre-softmax logit. Entropy and sink share are averaged
    over the batch and the queries that have a choice: the first query can only see itself, so its
    entropy is 0 and its sink share 1 whatever the model learned, and it is left out.
    """
    if weights.dim() != 4:
        raise ValueError(f"weights must be [batch, heads, queries, keys], got shape {list(weights.shape)}")
    if tuple(max_logit.shape) != tuple(weights.shape[:2]):
        raise ValueError(f"max_logit must be [batch, heads] = {list(weights.shape[:2])}, got {list(max_logit.shape)}")
    rows = weights[:, :, 1:] if weights.shape[2] > 1 else weights
    return {
        "entropy": attention_entropy(rows).mean(dim=(0, 2)),
        "max_logit": max_logit.double().amax(dim=0),
        "sink": rows[..., 0].double().mean(dim=(0, 2)),
    }


def is_sharded(trainer: L.Trainer) -> bool:
    """Whether the strategy shards parameters, so that rank 0 alone cannot run the model."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy))


class AttentionMapLogger(L.Callback):
    """Logs attention maps and per-head statistics of one fixed validation window.

    Args:
        every_n_steps: optimizer steps between two probes (one more runs at the end of training).
        window: tokens of the window (the start of the first validation window, cropped to the
            data's block size).
        heads: query heads to draw; ``None`` draws all of them when there are at most
            ``max_heads``, else ``max_heads`` heads spread evenly. The mean over heads is always
            drawn when the model has more than one head. Statistics cover every head.
        max_heads: see ``heads``.
        label_tokens: label the axes with the window's tokens when it is at most this long.
        gamma: contrast of the pictures: each map is scaled to its maximum and raised to ``gamma``.
        dirpath: where the PNGs go (default ``<trainer.default_root_dir>/attention``).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        window: int = 32,
        heads: list[int] | None = None,
        max_heads: int = 4,
        label_tokens: int = 32,
        gamma: float = 0.5,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("every_n_steps", every_n_steps, 1),
            ("window", window, 2),
            ("max_heads", max_heads, 1),
            ("label_tokens", label_tokens, 0),
        ):
            check_int(value, f"callbacks.attention_maps.{name}", minimum=low)
        if not 0 < gamma <= 1:
            raise ValueError(f"callbacks.attention_maps.gamma must be in (0, 1] (lower = more contrast), got {gamma!r}")
        if heads is not None and (not all(isinstance(h, int) and h >= 0 for h in heads) or not heads):
            raise ValueError(
                f"callbacks.attention_maps.heads must be a non-empty list of head indices or null, got {heads!r}"
            )
        self.every_n_steps = every_n_steps
        self.window = window
        self.heads = list(heads) if heads is not None else None
        self.max_heads = max_heads
        self.label_tokens = label_tokens
        self.gamma = gamma
        self.dirpath = dirpath
        self.total_seconds = 0.0
        self.calls = 0
        self._last_step = -1
        self._fit_start = 0.0
        self._warned_sharded = False

    # ---- hooks --------------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.probe(trainer, pl_module)
        if trainer.is_global_zero and self.calls:
            fit_seconds = time.perf_counter() - self._fit_start
            print(
                f"attention logging: {self.total_seconds:.2f} s in {self.calls} calls, "
                f"{100 * self.total_seconds / max(fit_seconds, 1e-9):.2f}% of {fit_seconds:.1f} s of training",
                flush=True,
            )

    # ---- the probe ----------------------------------------------------------------------------

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run the window, log statistics and pictures at ``trainer.global_step`` (rank 0 only)."""
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        if is_sharded(trainer):
            # Rank 0 alone cannot run a forward of a sharded model; the other ranks would have to join.
            if not self._warned_sharded:
                warnings.warn(f"attention maps are skipped under {type(trainer.strategy).__name__}", stacklevel=2)
                self._warned_sharded = True
            return
        if pl_module.device.type == "cuda":
            # Let the step's queued kernels finish first, so log_seconds is this callback's own cost.
            torch.cuda.synchronize(pl_module.device)
        start = time.perf_counter()
        model = trained_model(pl_module)
        idx = self._window_ids(trainer, pl_module)
        was_training = model.training
        model.eval()
        try:
            weights, max_logits = model.attention_probe(idx)
        finally:
            model.train(was_training)
        step = trainer.global_step
        scalars = self._scalars(weights, max_logits)
        pictures = self._pictures(trainer, weights, idx[0].tolist(), step)
        self._log(trainer, scalars, pictures, step)
        seconds = time.perf_counter() - start
        self.total_seconds += seconds
        self.calls += 1
        timing = {"attention/log_seconds": seconds, "attention/log_seconds_total": self.total_seconds}
        for logger in trainer.loggers:
            logger.log_metrics(timing, step=step)

    def _window_ids(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
        dataset = getattr(datamodule, "val_dataset", None)
        if dataset is not None:
            x = dataset[0][0]
        else:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            if loader is None:
                raise RuntimeError(
                    "attention maps need validation data (a datamodule with val_dataset or a val loader)"
                )
            x = next(iter(loader))[0][0]
        length = min(self.window, x.shape[-1], trained_model(pl_module).config.max_seq_len)
        return x[:length].reshape(1, length).to(device=pl_module.device, dtype=torch.long)

    def _shown_heads(self, heads: int) -> list[int]:
        if self.heads is not None:
            bad = [h for h in self.heads if h >= heads]
            if bad:
                raise ValueError(f"callbacks.attention_maps.heads {bad} out of range for a model with {heads} heads")
            return self.heads
        if heads <= self.max_heads:
            return list(range(heads))
        if self.max_heads <= 1:
            return [0]
        return sorted({round(i * (heads - 1) / (self.max_heads - 1)) for i in range(self.max_heads)})

    def _scalars(self, weights: list[torch.Tensor], max_logits: list[torch.Tensor]) -> dict[str, float]:
        per_layer = [attention_stats(w, m) for w, m in zip(weights, max_logits)]
        # One host transfer for everything.
        table = torch.stack([torch.stack([s["entropy"], s["max_logit"], s["sink"]]) for s in per_layer]).cpu()
        scalars: dict[str, float] = {}
        for layer, rows in enumerate(table.tolist()):
            for name, values in zip(("entropy", "max_logit", "sink"), rows):
                for head, value in enumerate(values):
                    scalars[f"attention/{name}/l{layer:02d}h{head:02d}"] = value
        scalars["attention/max_logit/max"] = float(table[:, 1].max())
        return scalars

    def _pictures(
        self, trainer: L.Trainer, weights: list[torch.Tensor], ids: list[int], step: int
    ) -> dict[str, list[tuple[str, Path, Image.Image]]]:
        """{``attention/layer_LL``: [(caption, PNG path, image), ...]}; each PNG is encoded once."""
        n = len(ids)
        tokens = None
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
        if n <= self.label_tokens and hasattr(datamodule, "decode"):
            tokens = [datamodule.decode([i]) for i in ids]
        renderer = HeatmapRenderer(n, tokens, self.gamma)
        pnginfo = renderer.layout.pnginfo(n, n)
        allowed = np.tril(np.ones((n, n), dtype=bool))
        root = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "attention"
        out_dir = root / f"step_{step:06d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        pictures: dict[str, list[tuple[str, Path, Image.Image]]] = {}
        for layer, w in enumerate(weights):
            maps = w[0].float().cpu()
            heads = maps.shape[0]
            chosen = [(f"head {h}", f"head{h:02d}", maps[h]) for h in self._shown_heads(heads)]
            if heads > 1:
                chosen.insert(0, ("mean of heads", "mean", maps.mean(dim=0)))
            key = f"attention/layer_{layer:02d}"
            pictures[key] = []
            for caption, name, m in chosen:
                image = renderer.render(m, allowed, title=f"step {step} layer {layer} {caption}")
                path = out_dir / f"layer{layer:02d}_{name}.png"
                # Fastest zlib level: these files are small, and this runs inside training.
                image.save(path, pnginfo=pnginfo, compress_level=1)
                pictures[key].append((caption, path, image))
        return pictures

    @staticmethod
    def _log(
        trainer: L.Trainer,
        scalars: dict[str, float],
        pictures: dict[str, list[tuple[str, Path, Image.Image]]],
        step: int,
    ) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, WandbLogger):
                # A path, not pixels: W&B copies the PNG instead of encoding it again.
                for key, items in pictures.items():
                    logger.log_image(
                        key=key,
                        images=[str(path) for _, path, _ in items],
                        step=step,
                        caption=[caption for caption, _, _ in items],
                    )
            elif isinstance(logger, TensorBoardLogger):
                for key, items in pictures.items():
                    for caption, _, image in items:
                        tag = f"{key}/{caption.replace(' ', '_')}"
                        logger.experiment.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")
