"""attn_impl='triton': the kernels under the Triton interpreter (in a subprocess, since
TRITON_INTERPRET must be set before Triton is imported), and the backend's routing and input
checks in this process."""

from __future__ import annotations

import pytest
import torch
from helpers import interpreter_unusable, run_interpreted

from mqa_lm.kernels import ATTENTION_BACKENDS
from mqa_lm.kernels.triton_backend import triton_importable, triton_interpreting
from mqa_lm.nn.attention import MultiQueryAttention

needs_triton = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")


@needs_triton
@pytest.mark.skipif(interpreter_unusable() is not None, reason=str(interpreter_unusable()))
def test_kernels_under_interpreter():
    result = run_interpreted("tests/triton_interpret_cases.py")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def _qk(dtype=torch.float32, device="cpu", head_dim=16):
    return torch.randn(1, 4, 5, head_dim, dtype=dtype, device=device), torch.randn(
        1, 1, 5, head_dim, dtype=dtype, device=device
    )


def _reason(q, k, **overrides):
    kwargs = dict(causal=True, bias=None, key_padding_mask=None, dropout_p=0.0)
    kwargs.update(overrides)
    backend = ATTENTION_BACKENDS.get("triton")
    # What the block asks: once per (device type, dtype), then per call.
    return backend.unsupported_on(q.device, q.dtype) or backend.unsupported(q, k, **kwargs)


@needs_triton
@pytest.mark.skipif(triton_interpreting(), reason="checks the routing without the interpreter")
def test_cpu_without_interpreter_falls_back_with_a_reason():
    q, k = _qk()
    assert "TRITON_INTERPRET=1" in _reason(q, k)


@needs_triton
def test_unsupported_names_what_the_kernel_cannot_do(monkeypatch):
    # Pretend the interpreter is on so the reasons past the device check are reached.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k = _qk()
    assert _reason(q, k) is None
    assert "dropout" in _reason(q, k, dropout_p=0.1)
    bias = torch.zeros(1, 4, 5, 5, requires_grad=True)
    assert "gradient for bias" in _reason(q, k, bias=bias)
    with torch.no_grad():
        assert _reason(q, k, bias=bias) is None
    q_big, k_big = _qk(head_dim=320)
    assert "head_dim" in _reason(q_big, k_big)
    q64, k64 = _qk(dtype=torch.float64)
    assert "float64" in _reason(q64, k64)


@pytest.mark.skipif(triton_interpreting(), reason="checks the fallback without the interpreter")
def test_block_on_cpu_runs_torch_and_says_why():
    torch.manual_seed(0)
    block = MultiQueryAttention(dim=32, heads=4, attn_impl="triton", verbose=1, attn_pdrop=0.0)
    x = torch.randn(2, 7, 32)
    with pytest.warns(UserWarning, match="falls back to 'torch'"):
        out, _, _ = block(x)
    block.attn_impl = "torch"
    want, _, _ = block(x)
    torch.testing.assert_close(out, want)


@needs_triton
def test_bad_inputs_raise_one_clear_error():
    from mqa_lm.kernels.triton.attention import check_attention_inputs

    q = torch.randn(2, 4, 5, 16)
    k = torch.randn(2, 1, 7, 16)
    with pytest.raises(ValueError, match="4-D"):
        check_attention_inputs(q[0], k, k)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        check_attention_inputs(q, torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16))
    with pytest.raises(ValueError, match="head_dim=16"):
        check_attention_inputs(q, torch.randn(2, 1, 7, 8), torch.randn(2, 1, 7, 8))
    with pytest.raises(TypeError, match="one dtype"):
        check_attention_inputs(q, k.half(), k.half())
    with pytest.raises(ValueError, match="broadcastable"):
        check_attention_inputs(q, k, k, bias=torch.zeros(1, 4, 5, 6))
    with pytest.raises(ValueError, match="gradient for bias"):
        check_attention_inputs(q, k, k, bias=torch.zeros(1, 4, 1, 7, requires_grad=True))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[batch=2, k_len=7\]"):
        check_attention_inputs(q, k, k, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="limit of 256"):
        check_attention_inputs(torch.randn(1, 1, 2, 320), torch.randn(1, 1, 2, 320), torch.randn(1, 1, 2, 320))
