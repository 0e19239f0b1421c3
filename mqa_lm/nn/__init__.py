"""Building blocks with no training machinery: the attention block, norms, linears, positions."""

from mqa_lm.nn.attention import MultiQueryAttention
from mqa_lm.nn.linears import LINEARS, build_linear
from mqa_lm.nn.norms import NORMS, build_norm
from mqa_lm.nn.positions import RotaryEmbedding, alibi_bias, alibi_slopes

__all__ = [
    "LINEARS",
    "NORMS",
    "MultiQueryAttention",
    "RotaryEmbedding",
    "alibi_bias",
    "alibi_slopes",
    "build_linear",
    "build_norm",
]
