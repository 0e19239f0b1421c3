"""mqa-lm: decoder-only language models built on Multi-Query Attention.

``import mqa_lm`` brings the model, generation and model files, and never Lightning or Hydra: training
lives in :mod:`mqa_lm.training` and the CLIs (``train.py``, ``generate.py``).
"""

from mqa_lm.inference import generate
from mqa_lm.model import MQAConfig, MQATransformer
from mqa_lm.nn.attention import MultiQueryAttention
from mqa_lm.pretrained import from_hf, load_pretrained, save_pretrained

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
