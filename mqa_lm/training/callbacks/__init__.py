"""Seeing inside a run: attention maps and statistics, samples, throughput/MFU, gradient norm,
W&B tracking, the progress bar and benchmarks (lm-eval). Each is a Lightning callback (or logger)
with a config under ``configs/callbacks/`` (``configs/logger/`` for W&B)."""

from mqa_lm.training.callbacks.attention import AttentionMapLogger, attention_entropy, attention_stats
from mqa_lm.training.callbacks.benchmarks import LMEvalCallback
from mqa_lm.training.callbacks.heatmap import render_heatmap, to_uint8
from mqa_lm.training.callbacks.pretrained_export import PretrainedExport
from mqa_lm.training.callbacks.progress import (
    ModelSizeSummary,
    TokensPerSecondBar,
    ValidationLine,
    model_summary,
    progress_bar,
)
from mqa_lm.training.callbacks.samples import SampleLogger
from mqa_lm.training.callbacks.throughput import PEAK_FLOPS, GradNormMonitor, TokenThroughputMonitor, peak_flops
from mqa_lm.training.callbacks.tracking import RunMetadata, RunWandbLogger, log_resolved_config, scrub_secrets

__all__ = [
    "AttentionMapLogger",
    "GradNormMonitor",
    "LMEvalCallback",
    "ModelSizeSummary",
    "PEAK_FLOPS",
    "PretrainedExport",
    "RunMetadata",
    "RunWandbLogger",
    "SampleLogger",
    "TokenThroughputMonitor",
    "TokensPerSecondBar",
    "ValidationLine",
    "attention_entropy",
    "attention_stats",
    "log_resolved_config",
    "model_summary",
    "peak_flops",
    "progress_bar",
    "render_heatmap",
    "scrub_secrets",
    "to_uint8",
]
