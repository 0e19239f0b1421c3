"""Triton's per-process start-up, paid on a background thread while the process imports torch.

A process's first Triton launch costs ~0.4 s of host work that does not depend on the kernel: importing
Triton (~0.1 s) and ``triton_key()``, which hashes Triton's own sources and its ~0.5 GB ``libtriton``
to key the on-disk cache (~0.3 s), even when the compiled binary is already on disk. Neither needs
torch nor a GPU, and hashing releases the GIL, so an entry point that will launch Triton kernels
starts this before importing torch and the work hides behind torch's import (seconds).

This module imports nothing beyond the standard library: importing it must not import torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading

_started: threading.Thread | None = None


def nvidia_gpu_likely() -> bool:
    """Whether an NVIDIA driver is loaded (Linux), without importing torch or initialising CUDA:
    a CPU-only machine skips the preparation instead of spending its cores on it."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def _prepare() -> None:
    try:
        import triton  # noqa: F401

        # triton_key is internal and has moved between releases (triton.compiler.compiler in 3.2-3.4,
        # triton.runtime.cache later); it is functools.lru_cache'd, so one call fills it for the
        # process. Where it is not found, the first launch pays it as before: nothing breaks.
        for name in ("triton.runtime.cache", "triton.compiler.compiler"):
            key = getattr(importlib.import_module(name), "triton_key", None)
            if callable(key):
                key()
                break
    except Exception:  # noqa: BLE001  an optimisation only: the first launch reports any real problem
        pass


def prepare_triton_in_background() -> threading.Thread | None:
    """Start Triton's kernel-independent start-up on a daemon thread (once per process); ``None``
    where there is nothing to gain: no NVIDIA driver, Triton not installed, or its CPU interpreter
    (``TRITON_INTERPRET=1``), which keys no cache."""
    global _started
    if _started is not None:
        return _started
    if os.environ.get("TRITON_INTERPRET") == "1" or not nvidia_gpu_likely():
        return None
    if importlib.util.find_spec("triton") is None:
        return None
    # A daemon: the work touches no device, so a process may end in the middle of it.
    _started = threading.Thread(target=_prepare, name="mqa-triton-prepare", daemon=True)
    _started.start()
    return _started
