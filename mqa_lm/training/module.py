"""The LightningModule: wraps :class:`MQATransformer` with the loss, the optimizer and the schedule."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from tokenizers import Tokenizer

from mqa_lm.inference import GenerationConfig, generate_from_config
from mqa_lm.model import MQAConfig, MQATransformer
from mqa_lm.optim import OptimConfig, build_optimizer, build_scheduler, default_optim_config
from mqa_lm.pretrained.directory import CHECKPOINT_TOKENIZER_KEY
from mqa_lm.training.config import COMPILE_SCOPES
from mqa_lm.training.distributed import is_fully_sharded, shard_model, shard_options


def check_vocab_fits(model_vocab: int, tokenizer_vocab: int) -> None:
    """Raise ValueError, naming both sizes and the fix, when the tokenizer's ids do not fit the model."""
    if model_vocab < tokenizer_vocab:
        raise ValueError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary of {tokenizer_vocab} ids; "
            f"raise model.vocab_size to at least {tokenizer_vocab}, or set model.vocab_size=null to take the "
            "tokenizer's size"
        )


def trained_model(pl_module: L.LightningModule) -> MQATransformer:
    """The :class:`MQATransformer` an :class:`MQALitModule` trains (its ``model``), for callbacks,
    which Lightning hands a plain ``LightningModule``; RuntimeError before ``configure_model`` built it."""
    model = getattr(pl_module, "model", None)
    if not isinstance(model, MQATransformer):
        raise RuntimeError("the model is built in configure_model(), once the datamodule's tokenizer is known")
    return model


def datamodule_tokenizer(trainer: L.Trainer | None) -> Tokenizer | None:
    """The attached datamodule's tokenizer, or None when there is none (yet)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return None
    try:
        tokenizer = getattr(datamodule, "tokenizer", None)
    except (RuntimeError, OSError):  # not prepared yet
        return None
    return tokenizer if isinstance(tokenizer, Tokenizer) else None


class MQALitModule(L.LightningModule):
    """Trains an :class:`MQATransformer` on (x, y) token windows.

    Built by ``train()`` from ``configs/module/`` (its ``_target_``) with the validated groups.

    Args:
        model: a validated :class:`MQAConfig`, or its fields as a plain dict (how a checkpoint's
            hyperparameters come back). A dict with ``vocab_size: None`` takes the size of the
            datamodule's tokenizer when the trainer builds the model (``configure_model``); the
            resolved value is written back into the saved hyperparameters, so a checkpoint rebuilds
            the same model.
        optim: a validated :class:`OptimConfig` (or :class:`~mqa_lm.optim.MuonConfig`), or its fields as a
            plain dict (``name`` picks the optimizer; without it, AdamW, as in checkpoints written before
            ``optim=muon``); None: :func:`~mqa_lm.optim.default_optim_config`, what ``train.py`` uses.
        compile: wrap the model in ``torch.compile`` (``train()`` resolves ``module.compile: auto``);
            the first training step's time, compilation included, is printed.
        compile_scope: ``model`` compiles the whole forward (loss included) as one graph; ``blocks``
            compiles each transformer block on its own (``nn.Module.compile``), so under data
            parallelism each block's gradients are ready, and can be all-reduced, as soon as its
            backward ends instead of after the whole backward graph; under FSDP2 (``trainer=fsdp``)
            its all-gathers and reduce-scatters then run between the graphs (``train()`` resolves
            ``module.compile_scope: auto`` to this there, to ``model`` elsewhere).
        vocab_from_data: with an :class:`MQAConfig`, ignore its ``vocab_size`` and take the
            tokenizer's (the config was validated with a stand-in because ``model.vocab_size`` is null).

    Hyperparameters are saved as plain containers, so checkpoints load with ``weights_only=True``.
    """

    # self.model, or its torch.compile wrapper: what forward calls; kept out of nn.Module's registry.
    _run_model: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]

    def __init__(
        self,
        model: MQAConfig | Mapping[str, Any],
        optim: OptimConfig | Mapping[str, Any] | None = None,
        compile: bool = False,
        vocab_from_data: bool = False,
        compile_scope: str = "model",
    ) -> None:
        super().__init__()
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False here (train() resolves 'auto'), got {compile!r}")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"module.compile_scope must be one of {', '.join(COMPILE_SCOPES)}, got {compile_scope!r}")
        self.compile_scope = compile_scope
        self._model_config = model if isinstance(model, MQAConfig) else None
        fields = model.to_dict() if isinstance(model, MQAConfig) else dict(model)
        if vocab_from_data:
            fields["vocab_size"] = None
        if optim is None:
            optim = default_optim_config()
        elif not isinstance(optim, OptimConfig):
            optim = OptimConfig.from_dict(dict(optim))
        self.optim_config = optim
        self.save_hyperparameters({"model": fields, "optim": optim.to_dict(), "compile": compile})
        self.model: MQATransformer | None = None
        self._first_step_started: float | None = None
        self._first_step_timed = False
        if fields.get("vocab_size") is not None:
            self._build(self._model_config or MQAConfig.from_dict(fields))

    # ---- model construction -----------------------------------------------------------------

    def _build(self, config: MQAConfig) -> None:
        self.hparams["model"] = config.to_dict()
        self.model = MQATransformer(config)
        run_model: Any = self.model
        if self.hparams["compile"] and self.compile_scope == "model":
            run_model = torch.compile(self.model)
        elif self.hparams["compile"]:
            for block in self.model.blocks:
                block.compile()  # in place: parameters and state_dict keys unchanged
        # Kept out of nn.Module registration, so the compiled wrapper adds no second set of
        # state_dict keys; it shares the parameters of self.model.
        self.__dict__["_run_model"] = run_model

    def configure_model(self) -> None:
        """Build the model once the tokenizer is known (``vocab_size: null``), or check that its
        vocabulary fits the tokenizer's; then, under a strategy with a device mesh (``trainer=fsdp``:
        :class:`~mqa_lm.training.distributed.FSDP2Strategy`), shard it with FSDP2, once, before the
        first forward (a compiled wrapper traces lazily, so it compiles the sharded modules)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.model is not None:
            # Runs after prepare_data: the first step would otherwise fail with an IndexError.
            tokenizer_vocab = getattr(datamodule, "vocab_size", None)
            if isinstance(tokenizer_vocab, int):
                check_vocab_fits(self.model.config.vocab_size, tokenizer_vocab)
        else:
            vocab_size = getattr(datamodule, "vocab_size", None)
            if vocab_size is None:
                raise ValueError(
                    "model.vocab_size is null and no datamodule with a tokenizer is attached; "
                    "set model.vocab_size or train with a datamodule"
                )
            if self._model_config is not None:  # validated already: only the vocabulary changes
                self._build(dataclasses.replace(self._model_config, vocab_size=int(vocab_size)))
            else:
                self._build(MQAConfig.from_dict({**self.hparams["model"], "vocab_size": int(vocab_size)}))
        mesh = self.device_mesh  # set by Lightning's ModelParallelStrategy (and ours) before this hook
        if mesh is not None and not is_fully_sharded(trained_model(self)):  # a later fit/validate: sharded already
            shard_model(trained_model(self), mesh, **shard_options(self.trainer))

    @property
    def config(self) -> MQAConfig:
        return trained_model(self).config

    # ---- steps ------------------------------------------------------------------------------

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self._run_model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self(x, y)
        # Not prog_bar: Lightning turns every prog_bar value into a float after each micro-batch (an
        # .item(), a host sync that idles the GPU while the next step is launched: 4% of a gpt2_small
        # step on an H100); the bar reads the loss itself when it refreshes (TokensPerSecondBar).
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.hparams["compile"] and not self._first_step_timed and self._first_step_started is None:
            self._first_step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The first compiled step traces and compiles forward and backward: say what that cost.
        if self._first_step_started is not None and not self._first_step_timed:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._first_step_timed = True
            rank_zero_info(f"compile + first step: {time.perf_counter() - self._first_step_started:.1f} s")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self(x, y)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The tokenizer travels with the weights (a plain str, so weights_only=True still loads it):
        # a checkpoint alone is enough to generate text (mqa_lm.pretrained.directory.load_pretrained).
        tokenizer = datamodule_tokenizer(self._trainer)
        if tokenizer is not None:
            checkpoint[CHECKPOINT_TOKENIZER_KEY] = tokenizer.to_str()

    def on_validation_epoch_end(self) -> None:
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            self.log("val/ppl", torch.exp(val_loss.float()), on_step=False, on_epoch=True, sync_dist=True)

    # ---- optimisation -----------------------------------------------------------------------

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        optimizer = build_optimizer(trained_model(self), self.optim_config, grad_scaling=scaler is not None)
        decay_steps = self.optim_config.decay_steps or self._max_steps()
        scheduler = build_scheduler(optimizer, self.optim_config, decay_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as the Trainer says; a fused AdamW under bf16 is clipped here directly.

        Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales
        gradients itself (``_step_supports_amp_scaling``: fused AdamW), though bf16 has no loss scale
        to undo; with no GradScaler in play, clipping the gradients as they stand is exactly right.
        (``optim=muon``'s :class:`~mqa_lm.optim.MuonAdamW` never unscales itself, fused AdamW inside
        or not, so Lightning clips it.)
        """
        unscales_itself = getattr(optimizer, "_step_supports_amp_scaling", False)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if unscales_itself and scaler is None and gradient_clip_val:
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _max_steps(self) -> int:
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps < 1:
            est = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
            if not math.isfinite(est):
                raise ValueError("set trainer.max_steps (or optim.decay_steps) so the cosine schedule has an end")
            return int(est)
        return int(max_steps)

    # ---- text in, text out ------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, prompt_ids: list[int], generation: GenerationConfig | None = None, eos_token_id: int | None = None
    ) -> list[int]:
        """Continue ``prompt_ids`` as ``generation`` says (default: :class:`GenerationConfig`'s defaults);
        ``eos_token_id`` ends the row when ``generation.stop_at_eos``. Returns prompt + continuation ids."""
        generation = generation or GenerationConfig()
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        out = generate_from_config(
            trained_model(self),
            idx,
            generation,
            eos_token_id=eos_token_id if generation.stop_at_eos else None,
            generator=torch.Generator(device=self.device).manual_seed(generation.seed),
        )
        return out[0].tolist()
