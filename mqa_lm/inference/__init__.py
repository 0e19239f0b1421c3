"""Generation: :func:`generate` (a loop over the model's forward with a static KV cache, a CUDA-graph
decode step and on-device sampling), its settings (:class:`GenerationConfig`) and text helpers."""

from mqa_lm.inference.config import CONTEXT_OVERFLOW, GenerationConfig
from mqa_lm.inference.engine import InferenceEngine, cache_length
from mqa_lm.inference.generation import clear_engines, generate, generate_from_config
from mqa_lm.inference.sampling import sample_with_uniform

__all__ = [
    "CONTEXT_OVERFLOW",
    "GenerationConfig",
    "InferenceEngine",
    "cache_length",
    "clear_engines",
    "generate",
    "generate_from_config",
    "sample_with_uniform",
]
