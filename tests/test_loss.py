"""linear_cross_entropy (mqa_lm/nn/loss.py) against float64 F.cross_entropy of the full logits:
values and gradients, ignored rows, chunks that do not divide N, bf16, autocast, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mqa_lm.nn.loss import linear_cross_entropy

N, D, V = 13, 8, 11


def inputs(dtype=torch.float64, seed=0, ignore=(0, 5, 6)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[list(ignore)] = -100
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), targets


def reference(hidden, weight, targets):
    """Loss and gradients from the whole float64 logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), grad_h, grad_w


@pytest.mark.parametrize("chunk_size", [1, 4, 5, N, 100])
def test_matches_float64_cross_entropy(chunk_size):
    hidden, weight, targets = inputs()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size)
    grad_h, grad_w = torch.autograd.grad(loss * 3.0, (hidden, weight))  # a non-unit upstream gradient
    want, want_h, want_w = reference(hidden, weight, targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_h, 3.0 * want_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_w, 3.0 * want_w, rtol=1e-12, atol=1e-12)
    assert grad_h[[0, 5, 6]].abs().max() == 0  # ignored rows get no gradient


def test_ignore_index_other_than_minus_100_and_only_one_input_needing_grad():
    hidden, weight, targets = inputs(ignore=())
    targets[[2, 3]] = 7
    loss = linear_cross_entropy(hidden, weight.detach(), targets, 4, ignore_index=7)
    (grad_h,) = torch.autograd.grad(loss, (hidden,))
    h = hidden.detach().requires_grad_()
    want = F.cross_entropy(h @ weight.detach().t(), targets, ignore_index=7)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_h, h.grad, rtol=1e-12, atol=1e-12)


def test_every_row_ignored_gives_nan_like_cross_entropy():
    hidden, weight, targets = inputs()
    targets[:] = -100
    loss = linear_cross_entropy(hidden, weight, targets, 4)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.t(), targets))


def test_bf16_inputs_are_close_to_float64():
    hidden, weight, targets = inputs(torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, targets, 5)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    want, want_h, want_w = reference(hidden, weight, targets)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_h.double(), want_h, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(grad_w.double(), want_w, rtol=5e-2, atol=5e-3)


def test_under_autocast_matches_the_plain_linear_path():
    hidden, weight, targets = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, 4)
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(plain, (hidden, weight))
    assert all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, plain, rtol=1e-2, atol=1e-2)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-3)


def test_no_grad_returns_the_loss():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(hidden, weight, targets)[0], rtol=1e-12, atol=1e-12)


def test_under_torch_compile():
    hidden, weight, targets = inputs()
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, 4), backend="eager")
    loss = compiled(hidden, weight, targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    want, want_h, want_w = reference(hidden, weight, targets)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], want_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], want_w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (dict(hidden=torch.zeros(3)), r"hidden must be a floating-point \[N, d\] tensor, got torch.float32 \[3\]"),
        (dict(weight=torch.zeros(V, D + 1)), r"weight must be \[V, d=8\], got torch.float32 \[11, 9\]"),
        (dict(targets=torch.zeros(N + 1, dtype=torch.long)), r"targets must be integer class ids \[N=13\]"),
        (dict(targets=torch.zeros(N)), r"targets must be integer class ids \[N=13\], got torch.float32"),
        (dict(chunk_size=0), r"chunk_size must be an integer >= 1, got 0"),
        (dict(weight=torch.zeros(V, D)), r"hidden \(torch.float64\) and weight \(torch.float32\) must share a dtype"),
    ],
)
def test_bad_inputs_name_the_argument(args, pattern):
    hidden, weight, targets = inputs()
    kwargs = dict(hidden=hidden, weight=weight, targets=targets, chunk_size=4)
    kwargs.update(args)
    with pytest.raises(ValueError, match=pattern):
        linear_cross_entropy(**kwargs)


def test_gradients_are_formed_only_when_wanted():
    # Evaluation costs the logits' matmul alone; training forms both gradients in the forward, and
    # the backward only scales them (no matmul at all).
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, targets = inputs()
    logits_flops = 2 * N * D * V
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        linear_cross_entropy(hidden, weight, targets, 4)
    with FlopCounterMode(display=False) as forward:
        loss = linear_cross_entropy(hidden, weight, targets, 4)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    assert evaluation.get_total_flops() == logits_flops
    assert forward.get_total_flops() == 3 * logits_flops
    assert backward.get_total_flops() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_autocast_matches_float64_on_a_gpt2_sized_head():
    # 4096 rows x 50304 classes: the whole fp32 logits alone would take 824 MB; everything the chunked
    # loss holds at once (bf16 copies of the inputs, the fp32 weight gradient, one 512-row chunk)
    # stays well below that.
    gen = torch.Generator("cuda").manual_seed(0)
    hidden = (torch.randn(4096, 768, device="cuda", generator=gen) * 0.5).requires_grad_()
    weight = (torch.randn(50304, 768, device="cuda", generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, 50304, (4096,), device="cuda", generator=gen)
    targets[::7] = -100
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, 512)
    peak = torch.cuda.max_memory_allocated() - base
    loss.backward()
    assert peak < 0.75 * 4096 * 50304 * 4, f"peak {peak / 2**20:.0f} MiB"
    want, want_h, want_w = reference(hidden, weight, targets)
    assert abs(loss.double() - want) / want < 1e-3
    for got, ref in ((hidden.grad, want_h), (weight.grad, want_w)):
        assert ((got.double() - ref).norm() / ref.norm()) < 2e-2
