"""Generated text at every validation: a W&B table, the console and ``<run>/samples.txt``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from mqa_lm.data.tokenizer import EOT
from mqa_lm.inference import GenerationConfig
from mqa_lm.training.callbacks.attention import is_sharded
from mqa_lm.utils.config import check_int

if TYPE_CHECKING:
    from mqa_lm.training.module import MQALitModule


class SampleLogger(L.Callback):
    """After each validation (not the sanity check), continue a few prompts and show the text.

    Args:
        prompts: prompt strings; when empty, the first ``prompt_tokens`` tokens of the first
            ``num_prompts`` validation windows (the same every time) are the prompts.
        num_prompts: validation-window prompts to use when ``prompts`` is empty.
        prompt_tokens: length of those prompts.
        filename: appended to under ``trainer.default_root_dir`` (rank 0).
        generation: :class:`~mqa_lm.inference.GenerationConfig` fields (``max_new_tokens`` 64 here);
            ``seed`` fixes the draws, so successive tables differ by the model, not by chance (sample
            ``i`` uses ``seed + i``).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        num_prompts: int = 2,
        prompt_tokens: int = 16,
        filename: str = "samples.txt",
        **generation: Any,
    ) -> None:
        super().__init__()
        check_int(num_prompts, "callbacks.samples.num_prompts")
        check_int(prompt_tokens, "callbacks.samples.prompt_tokens")
        # Short continuations by default: they print after every validation.
        self.generation = GenerationConfig.from_dict({"max_new_tokens": 64, **generation}, prefix="callbacks.samples.")
        self.prompts = list(prompts or [])
        self.num_prompts = num_prompts
        self.prompt_tokens = prompt_tokens
        self.filename = filename

    def _prompt_ids(self, trainer: L.Trainer) -> list[list[int]]:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, not declared on Trainer
        if self.prompts:
            return [datamodule.encode(p) or [0] for p in self.prompts]
        dataset = datamodule.val_dataset
        count = min(self.num_prompts, len(dataset))
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
            settings = dataclasses.replace(self.generation, seed=self.generation.seed + i)
            ids = module.sample(prompt, settings, eos_token_id=datamodule.tokenizer.token_to_id(EOT))
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
