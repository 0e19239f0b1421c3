"""A generation process's first CUDA work, done on a thread while the command line is still being read.

The first launch in a process of each kernel family (cuBLAS and its handle, SDPA's flash kernel, the
embedding, the norm, the sampling ops) costs the CUDA driver's lazy module loading, ~0.3 s in all on an
H100 for a prompt's prefill, and the process's CUDA context costs more. Without this, all of it
lands between the model's load and the first token. :func:`start_device_warmup` launches the same
families once, on small tensors, on a thread that an entry point starts as soon as it knows the device
(``generate.py`` does so after Hydra's first composition of its config): PyTorch's operators release
the GIL while they run, so the work overlaps the rest of the command's start-up (Hydra composing
again, imports, reading the weights). :func:`wait_for_device_warmup` joins it; the engine does so
before it captures a CUDA graph, which no other thread's launch may interleave.

Nothing here changes a result: the tensors are the thread's own and are dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F

from mqa_lm.inference.config import GenerationConfig
from mqa_lm.inference.sampling import sample_with_uniform

if TYPE_CHECKING:
    from mqa_lm.model import MQAConfig

_lock = threading.Lock()
_thread: threading.Thread | None = None
error: BaseException | None = None  # what stopped the warm-up, if anything did (for tests and debugging)

# What the warm-up assumes of a model whose config it was not given: GPT-2 small's widths.
_DEFAULT_WIDTHS = {"d_model": 768, "heads": 12, "kv_heads": 1, "vocab_size": 50304}

# The model's config, or a function that reads it (called on the thread, after the context exists).
ModelWidths = Union["MQAConfig", Callable[[], "MQAConfig | None"], None]


def start_device_warmup(
    device: torch.device,
    dtype: torch.dtype,
    model: ModelWidths = None,
    generation: GenerationConfig | None = None,
) -> threading.Thread | None:
    """Launch, on a thread, each kernel family a prompt's prefill and its first sample launch on
    ``device`` in ``dtype``, at ``model``'s widths where given (kernel variants depend on the head
    width and the vocabulary; a callable is called on the thread once the CUDA context exists, so
    reading a config file overlaps creating it) and with ``generation``'s sampling settings. Once
    per process; None for a device other than CUDA."""
    global _thread
    if device.type != "cuda":
        return None
    with _lock:
        if _thread is not None:
            return _thread
        # Not a daemon: a process that fails before generating waits for it rather than tearing
        # CUDA down under a launch.
        _thread = threading.Thread(
            target=_warm, args=(device, dtype, model, generation or GenerationConfig()), name="mqa-device-warmup"
        )
        _thread.start()
        return _thread


def wait_for_device_warmup() -> None:
    """Join the warm-up thread, if one was started and is still running."""
    thread = _thread
    if thread is not None and thread.is_alive():
        thread.join()


def _warm(device: torch.device, dtype: torch.dtype, model: ModelWidths, generation: GenerationConfig) -> None:
    try:
        with torch.no_grad(), torch.cuda.device(device):
            torch.zeros(1, device=device)  # the CUDA context, if nothing created it yet
            config = model() if callable(model) else model
            _launch_families(device, dtype, config, generation)
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001  an optimisation only: the real call reports any real problem
        global error
        error = err


def _launch_families(
    device: torch.device, dtype: torch.dtype, model: MQAConfig | None, generation: GenerationConfig
) -> None:
    from mqa_lm.nn.attention import PREFILL_SDPA  # the backends the prefill allows
    from mqa_lm.nn.norms import build_norm

    widths = {key: getattr(model, key, default) for key, default in _DEFAULT_WIDTHS.items()}
    d, heads, kv_heads, vocab = widths["d_model"], widths["heads"], widths["kv_heads"], widths["vocab_size"]
    head_dim = d // heads
    rows, seq = 1, 8
    table = torch.zeros(16, d, device=device, dtype=dtype)
    ids = torch.zeros(rows, seq, device=device, dtype=torch.long)
    x = F.embedding(ids, table) + F.embedding(ids, table)
    norm_type = model.norm_type if model is not None else "low_precision_layernorm"
    x = build_norm(norm_type, d, device=device).to(dtype)(x)
    weight = torch.zeros(d, d, device=device, dtype=dtype)
    F.linear(x, weight)
    F.linear(x, weight, weight[0])
    q = torch.zeros(rows, heads, seq, head_dim, device=device, dtype=dtype)
    k = torch.zeros(rows, kv_heads, seq, head_dim, device=device, dtype=dtype)
    with torch.nn.attention.sdpa_kernel(PREFILL_SDPA):
        F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=kv_heads != heads)
    q.transpose(1, 2).contiguous()  # a strided copy: the cache write, the heads merged back
    if model is not None and model.mlp_type == "swiglu":
        F.silu(x) * x
    else:
        F.gelu(x, approximate="tanh")
    logits = torch.zeros(rows, vocab, device=device, dtype=dtype)
    uniform = torch.rand(rows, device=device)
    top_k = generation.top_k if generation.top_k is not None and generation.top_k < vocab else None
    token = sample_with_uniform(logits, uniform, generation.temperature, top_k, generation.top_p)
    finished = torch.zeros(rows, device=device, dtype=torch.bool)  # a row's end of sequence
    token = torch.where(finished, 0, token)
    finished |= token == 0
