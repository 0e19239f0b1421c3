"""Where and in what precision a model runs: the ``device=`` / ``dtype=`` options of eval.py and of
:class:`~mqa_lm.evaluation.harness.MQALM` (``auto`` = CUDA and bf16 when a GPU is there, else CPU and fp32)."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def check_device(name: object, key: str = "device") -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``; ValueError naming ``key`` otherwise."""
    text = str(name)
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"{key}={name!r} is not one of: {', '.join(DEVICES)} (or cuda:<index>)")
    return text


def check_dtype(name: object, key: str = "dtype") -> str:
    """``name`` if it is ``auto`` or a name in :data:`DTYPES`; ValueError naming ``key`` otherwise."""
    if str(name) != "auto" and str(name) not in DTYPES:
        raise ValueError(f"{key}={name!r} is not one of: auto, {', '.join(DTYPES)}")
    return str(name)


def resolve_device(name: str) -> torch.device:
    """The device ``name`` (checked by :func:`check_device`) means here; ValueError when it asks
    for CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 elsewhere; else the dtype ``name`` names."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[check_dtype(name)]
