"""Triton's per-process start-up on a thread (mqa_lm.utils.triton_prepare): what generate.py starts before
its imports bring in torch, so it must import neither, and it must fill the cache Triton's first
launch reads."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from helpers import ROOT, run_env

from mqa_lm.utils import triton_prepare


def test_importing_it_imports_neither_torch_nor_triton():
    code = "import sys, mqa_lm.utils.triton_prepare; print(sorted({'torch', 'triton'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _triton_key():
    pytest.importorskip("triton")
    for name in ("triton.runtime.cache", "triton.compiler.compiler"):
        key = getattr(importlib.import_module(name), "triton_key", None)
        if callable(key):
            return key
    pytest.fail("this Triton has no triton_key where triton_prepare looks: its preparation does nothing")


def test_the_preparation_fills_the_key_triton_hashes_at_its_first_launch():
    key = _triton_key()
    key.cache_clear()
    assert key.cache_info().currsize == 0
    triton_prepare._prepare()
    assert key.cache_info().currsize == 1
    assert key.cache_info().hits == 0  # computed by the preparation, not before


def test_nothing_starts_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_prepare, "_started", None)
    assert triton_prepare.prepare_triton_in_background() is None
