"""Generated text at every validation: a W&B table, the console and ``<run>/samples.txt``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from mqa_lm.callbacks.attention import is_sharded

if TYPE_CHECKING:
    from mqa_lm.lit_module import MQALitModule


class SampleLogger(L.Callback):
    """After each validation (not the sanity check), continue a few prompts and show the text.

    Args:
        prompts: prompt strings; when empty, the first ``prompt_tokens`` tokens of the first
            ``num_samples`` validation windows (the same every time) are the prompts.
        num_samples: validation-window prompts to use when ``prompts`` is empty.
        prompt_tokens: length of those prompts.
        max_new_tokens, temperature, top_k: generation settings.
        seed: the sampling seed, so successive tables differ by the model, not by chance.
        filename: appended to under ``trainer.default_root_dir`` (rank 0).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        num_samples: int = 2,
        prompt_tokens: int = 16,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
        filename: str = "samples.txt",
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_samples", num_samples, 1),
            ("prompt_tokens", prompt_tokens, 1),
            ("max_new_tokens", max_new_tokens, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"callbacks.samples.{name} must be an integer >= {low}, got {value!r}")
        if not temperature >= 0:
            raise ValueError(f"callbacks.samples.temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"callbacks.samples.top_k must be >= 1 or null, got {top_k!r}")
        self.prompts = list(prompts or [])
        self.num_samples = num_samples
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_k = top_k
        self.seed = seed
        self.filename = filename

    def _prompt_ids(self, trainer: L.Trainer) -> list[list[int]]:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
        if self.prompts:
            return [datamodule.encode(p) or [0] for p in self.prompts]
        dataset = datamodule.val_dataset
        count = min(self.num_samples, len(dataset))
        return [dataset[i][0][: self.prompt_tokens].tolist() for i in range(count)]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
        if trainer.sanity_checking or not trainer.is_global_zero or is_sharded(trainer):
            return
        if not (hasattr(datamodule, "encode") and hasattr(datamodule, "decode")):
            return
        step = trainer.global_step
        module = cast("MQALitModule", pl_module)  # the only module this callback is attached to
        rows = []
        for i, prompt in enumerate(self._prompt_ids(trainer)):
            ids = module.sample(
                prompt, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, seed=self.seed + i
            )
            rows.append([step, datamodule.decode(prompt), datamodule.decode(ids[len(prompt) :])])
        text = "\n".join(f"--- sample {i} (step {step}) ---\n{p}|>>|{c}" for i, (_, p, c) in enumerate(rows))
        print(f"\nsamples at step {step} (prompt|>>|continuation):\n{text}\n", flush=True)
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="samples", columns=["step", "prompt", "continuation"], data=rows, step=step)
