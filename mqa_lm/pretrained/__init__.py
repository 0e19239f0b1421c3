"""Model files: everything that writes a trained model to disk or reads one back, without Lightning.

* :mod:`~mqa_lm.pretrained.directory`: :func:`save_pretrained` / :func:`load_pretrained`, the
  self-contained model directory (``model.safetensors`` + ``config.json`` + ``tokenizer.json``), and
  reading a training run directory or a Lightning ``.ckpt`` as a model;
* :mod:`~mqa_lm.pretrained.hf`: the Hugging Face transformers format both ways (GPTBigCode, Llama),
  behind :func:`from_hf` and ``python -m mqa_lm.export``;
* :mod:`~mqa_lm.pretrained.checkpoint`: training checkpoint files written atomically and checked whole
  and safe (``weights_only``) before anything loads them;
* :mod:`~mqa_lm.pretrained.placement`: the ``device`` / ``dtype`` rules of a loaded model (``auto`` =
  CUDA and bf16 when a GPU is there, else CPU and fp32).

Imports the model, the tokenizer and :mod:`mqa_lm.utils`; never generation, training, Lightning or Hydra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqa_lm.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from mqa_lm.pretrained.directory import (
        MissingTokenizerError,
        PretrainedError,
        from_hf,
        load_pretrained,
        save_pretrained,
    )

_EXPORTS = {
    name: "mqa_lm.pretrained.directory"
    for name in ("MissingTokenizerError", "PretrainedError", "from_hf", "load_pretrained", "save_pretrained")
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "MissingTokenizerError",
    "PretrainedError",
    "from_hf",
    "load_pretrained",
    "save_pretrained",
]
