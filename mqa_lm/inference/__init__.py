"""Generation: :func:`generate` and the engine behind it (a static KV cache, a CUDA-graph decode step
and on-device sampling)."""

from mqa_lm.inference.engine import InferenceEngine, cache_length, clear_engines
from mqa_lm.inference.generate import generate
from mqa_lm.inference.sampling import sample_with_uniform

__all__ = ["InferenceEngine", "cache_length", "clear_engines", "generate", "sample_with_uniform"]
