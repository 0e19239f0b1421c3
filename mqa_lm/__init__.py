"""mqa-lm: decoder-only language models built on Multi-Query Attention."""

from mqa_lm import config_store  # noqa: F401  (registers model/_base for Hydra; see there)
from mqa_lm.model import MQAConfig, MQATransformer
from mqa_lm.nn.attention import MultiQueryAttention

__all__ = ["MQAConfig", "MQATransformer", "MultiQueryAttention"]
__version__ = "0.1.0"
