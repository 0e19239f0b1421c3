"""mqa-lm: decoder-only language models built on Multi-Query Attention.

``from mqa_lm import X`` imports only what ``X`` needs (PEP 562): the block, the model, generation
and model files, never Lightning or Hydra. The packages, bottom to top (each imports only those
below it): ``utils`` -> ``kernels`` -> ``nn`` -> ``model``, ``optim``, ``data`` -> ``inference``,
``pretrained`` (model files) -> ``evaluation`` -> ``cli`` -> ``training`` (Lightning) -> the entry
points ``train.py``, ``generate.py``, ``eval.py`` and ``python -m mqa_lm.export``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mqa_lm.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from mqa_lm.inference.generation import generate
    from mqa_lm.model import MQAConfig, MQATransformer
    from mqa_lm.nn.attention import MultiQueryAttention
    from mqa_lm.pretrained.directory import from_hf, load_pretrained, save_pretrained

_EXPORTS = {
    "MQAConfig": "mqa_lm.model",
    "MQATransformer": "mqa_lm.model",
    "MultiQueryAttention": "mqa_lm.nn.attention",
    "from_hf": "mqa_lm.pretrained.directory",
    "generate": "mqa_lm.inference.generation",
    "load_pretrained": "mqa_lm.pretrained.directory",
    "save_pretrained": "mqa_lm.pretrained.directory",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "MQAConfig",
    "MQATransformer",
    "MultiQueryAttention",
    "from_hf",
    "generate",
    "load_pretrained",
    "save_pretrained",
]
__version__ = "0.1.0"
