"""``MultiQueryAttention``: the attention block, API-compatible with llm-foundry's / Zeta's MQA.

One fused QKV projection, optional clipping and QK-norm, optional rotary positions, a KV cache in one
layout for every backend, and the attention itself from the backend registered under ``attn_impl``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mqa_lm.kernels import ATTENTION_BACKENDS, reference_attention, resolve_impl, sdpa_attention
from mqa_lm.kernels.common import AttentionBackend, allowed_keys
from mqa_lm.nn.cache import StaticKVCache, StaticLayerCache
from mqa_lm.nn.linears import LINEARS, build_linear
from mqa_lm.nn.norms import DEFAULT_EPS, NORMS, build_norm
from mqa_lm.nn.positions import RotaryEmbedding
from mqa_lm.utils.config import check_int

log = logging.getLogger("mqa_lm.attention")

KVCache = tuple[torch.Tensor, torch.Tensor]


class _Kernel(NamedTuple):
    """What calls without weights run on one (device type, dtype): the backend's name and callable,
    its per-call check (None when it has none) and, when the whole pair falls back to ``torch``,
    the note saying why."""

    name: str
    fn: Callable[..., torch.Tensor]
    call_check: Callable[..., str | None] | None
    note: str | None


_TORCH = ATTENTION_BACKENDS.get("torch")


class MultiQueryAttention(nn.Module):
    """Multi-query attention (one shared K/V head), or grouped-query / multi-head via ``kv_heads``.

    Args:
        dim: model width; ``head_dim = dim // heads``.
        heads: number of query heads.
        attn_impl: attention backend: ``torch`` (PyTorch SDPA), ``flash`` (FlashAttention-4, else
            flash-attn FA2/FA3, else PyTorch's flash kernel; CUDA only), ``triton`` (our kernels; on
            CPU without ``TRITON_INTERPRET=1`` it runs ``torch``) or ``auto`` (``torch`` today; the
            choice and its reason live in :func:`mqa_lm.kernels.resolve_impl`).
        clip_qkv: if set, q, k and v are clamped to ``[-clip_qkv, clip_qkv]``.
        qk_ln: normalise queries (over ``dim``) and keys (over ``kv_heads * head_dim``) with the
            ``norm_type`` norm, as llm-foundry does.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        attn_pdrop: dropout on the attention probabilities, in training mode only.
        norm_type: ``layernorm``, ``low_precision_layernorm``, ``rmsnorm``, ``low_precision_rmsnorm``.
        fc_type: ``torch`` (nn.Linear) or ``te`` (TransformerEngine).
        verbose: 0 silent; 1 warns once per reason when a call falls back to another backend;
            2 also logs which kernel every call used (logger ``mqa_lm.attention``).
        device: where the parameters are created.
        kv_heads: K/V heads (our extension): 1 = MQA, ``heads`` = MHA, any divisor = GQA.
        rope_theta: if set, rotary position embeddings with this base are applied to q and k at
            their absolute positions (cache length + offset).
        bias: whether the projections carry a bias.
        norm_eps: the epsilon of the ``qk_ln`` norms.

    ``forward`` returns ``(context, attn_weights, past_key_value)``; see :meth:`forward`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attn_impl: str = "triton",
        clip_qkv: float | None = None,
        qk_ln: bool = False,
        softmax_scale: float | None = None,
        attn_pdrop: float = 0.0,
        norm_type: str = "low_precision_layernorm",
        fc_type: str = "torch",
        verbose: int = 0,
        device: torch.device | str | None = None,
        kv_heads: int = 1,
        rope_theta: float | None = None,
        bias: bool = True,
        norm_eps: float = DEFAULT_EPS,
    ) -> None:
        check_attention_args(
            dim=dim,
            heads=heads,
            kv_heads=kv_heads,
            attn_impl=attn_impl,
            clip_qkv=clip_qkv,
            softmax_scale=softmax_scale,
            attn_pdrop=attn_pdrop,
            norm_type=norm_type,
            fc_type=fc_type,
            verbose=verbose,
            rope_theta=rope_theta,
            norm_eps=norm_eps,
        )
        self._build(
            dim=dim,
            heads=heads,
            attn_impl=attn_impl,
            clip_qkv=clip_qkv,
            qk_ln=qk_ln,
            softmax_scale=softmax_scale,
            attn_pdrop=attn_pdrop,
            norm_type=norm_type,
            fc_type=fc_type,
            verbose=verbose,
            device=device,
            kv_heads=kv_heads,
            rope_theta=rope_theta,
            bias=bias,
            norm_eps=norm_eps,
        )

    @classmethod
    def prechecked(cls, **kwargs: Any) -> MultiQueryAttention:
        """Build from arguments the caller already passed through :func:`check_attention_args`,
        without checking them again. Takes every argument of ``__init__`` by keyword.

        ``MQAConfig`` checks the attention arguments once, with errors naming its fields; the model's
        blocks then build every layer through here instead of re-checking per layer. Also takes
        ``rope_max_positions``: the length of the rotary tables that per-token ``positions`` index
        (the model's ``max_seq_len``)."""
        block = cls.__new__(cls)
        block._build(**kwargs)
        return block

    def _build(
        self,
        *,
        dim: int,
        heads: int,
        attn_impl: str,
        clip_qkv: float | None,
        qk_ln: bool,
        softmax_scale: float | None,
        attn_pdrop: float,
        norm_type: str,
        fc_type: str,
        verbose: int,
        device: torch.device | str | None,
        kv_heads: int,
        rope_theta: float | None,
        bias: bool,
        norm_eps: float = DEFAULT_EPS,
        rope_max_positions: int = RotaryEmbedding.DEFAULT_MAX_POSITIONS,
    ) -> None:
        nn.Module.__init__(self)
        self.dim = dim
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = dim // heads
        self.attn_impl = attn_impl
        self.clip_qkv = clip_qkv
        self.qk_ln = qk_ln
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.attn_pdrop = attn_pdrop
        self.verbose = verbose
        self._warned: set[str] = set()

        kv_dim = kv_heads * self.head_dim
        self.Wqkv = build_linear(fc_type, dim, dim + 2 * kv_dim, bias=bias, device=device)
        self.out_proj = build_linear(fc_type, dim, dim, bias=bias, device=device)
        if qk_ln:
            self.q_ln = build_norm(norm_type, dim, device=device, eps=norm_eps)
            self.k_ln = build_norm(norm_type, kv_dim, device=device, eps=norm_eps)
        self.rotary = RotaryEmbedding(self.head_dim, rope_theta, rope_max_positions) if rope_theta else None

    # ---- which kernel: decided once per device type and dtype, not per call ---------------------

    @property
    def attn_impl(self) -> str:
        """The backend name given at construction; setting it re-resolves the backend."""
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        ATTENTION_BACKENDS.get(value)
        self._attn_impl = value
        # device type -> the backend attn_impl names there (its device check passed).
        self._device_backends: dict[str, AttentionBackend] = {}
        # (device type, q dtype) -> the kernel calls without weights use there; see _resolve_kernel.
        self._kernels: dict[tuple[str, torch.dtype], _Kernel] = {}

    def _resolve_device(self, device: torch.device) -> AttentionBackend:
        backend = ATTENTION_BACKENDS.get(resolve_impl(self._attn_impl, device))
        backend.check_device(device)  # raises before any work; nothing is cached then
        self._device_backends[device.type] = backend
        return backend

    def _resolve_kernel(self, device: torch.device, dtype: torch.dtype) -> _Kernel:
        impl = resolve_impl(self._attn_impl, device)
        backend = ATTENTION_BACKENDS.get(impl)
        reason = backend.unsupported_on(device, dtype)
        if reason is not None:
            kernel = _Kernel("torch", _TORCH, None, f"attn_impl={self._attn_impl!r} falls back to 'torch': {reason}")
        else:
            # Only backends with per-call limits are asked per call.
            overridden = type(backend).unsupported is not AttentionBackend.unsupported
            kernel = _Kernel(impl, backend, backend.unsupported if overridden else None, None)
        self._kernels[(device.type, dtype)] = kernel
        return kernel

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        past_key_value: KVCache | None = None,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
        needs_weights: bool = False,
        *,
        positions: torch.Tensor | None = None,
        cache: StaticLayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KVCache]:
        """Attend ``x`` [batch, seq, dim] to itself and to the cached keys/values.

        Args:
            past_key_value: ``(key, value)``, each [batch, kv_heads, past_len, head_dim], as returned
                by an earlier call; the new keys/values are appended.
            bias: additive, broadcastable to [batch, heads, seq, past_len + seq]; a bias built for a
                longer length is cropped to its last ``seq`` rows and ``past_len + seq`` columns.
            mask: key padding mask [batch, past_len + seq], True/1 = attend. A query with no key to
                attend gets a zero context.
            causal: query ``i`` sees keys up to its own position, aligned bottom-right (the new
                tokens are the last ones), so chunked prefill and decoding are exact.
            needs_weights: also return the post-softmax weights [batch, heads, seq, past_len + seq]
                (before dropout). Kernels that cannot return them (``torch``'s SDPA, ``flash``,
                ``triton``) run that call through the reference math path instead.
            positions: int [batch, seq], each token's absolute position for RoPE (default
                ``past_len + 0..seq-1`` for every row); rows of a left-padded batch count from their
                first real token. Must stay below the rotary table's ``max_positions``.
            cache: one layer of a :class:`~mqa_lm.nn.cache.StaticKVCache` instead of
                ``past_key_value``/``mask``: several tokens fill an empty cache (a prefill, causal among
                themselves, its key mask hiding padding); one token is written at the cache's slot and
                attends over the whole buffer through the mask (the fixed-shape decode step).

        Returns:
            ``(context [batch, seq, dim], attn_weights or None, (key, value) after this call)``; with
            a static ``cache``, its whole key and value buffers.
        """
        context, weights, _, present = self._attend(
            x, past_key_value, bias, mask, causal, needs_weights, False, positions, cache
        )
        return context, weights, present

    def probe(
        self,
        x: torch.Tensor,
        past_key_value: KVCache | None = None,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KVCache]:
        """Diagnostics: :meth:`forward` with ``needs_weights=True`` that also returns the largest
        pre-softmax logit per [batch, head] (:func:`max_attention_logit`), the logit growth that
        ``qk_ln`` and ``clip_qkv`` exist to prevent.

        Returns:
            ``(context, attn_weights, max_logit [batch, heads] fp32, (key, value))``.
        """
        context, weights, max_logit, present = self._attend(
            x, past_key_value, bias, mask, causal, True, True, None, None
        )
        assert weights is not None and max_logit is not None
        return context, weights, max_logit, present

    def decode_context(
        self,
        x: torch.Tensor,
        qkv: torch.Tensor,
        bias: torch.Tensor | None,
        positions: torch.Tensor | None,
        cache: StaticLayerCache,
        kv_written: bool = False,
    ) -> tuple[torch.Tensor, KVCache]:
        """One decode step of :meth:`forward` into a static ``cache`` from ``qkv``, the projection of
        ``x`` made by the caller, returning ``(context before out_proj [batch, 1, dim], (key, value))``:
        the caller fuses the norm into the projection and ``out_proj`` with the residual add
        (:mod:`mqa_lm.kernels.triton.decode_linear`), and ``kv_written``: it also wrote the keys and
        values into ``cache`` (see :attr:`kv_as_projected`)."""
        assert not kv_written or self.kv_as_projected
        context, _, _, present = self._attend(
            x, None, bias, None, True, False, False, positions, cache, qkv=qkv, project=False, kv_written=kv_written
        )
        return context, present

    @property
    def kv_as_projected(self) -> bool:
        """Whether a decode step caches the keys and values exactly as the QKV projection outputs them
        (no clipping, QK-norm or rotary positions in between), so the projection may write them."""
        return self.rotary is None and not self.qk_ln and self.clip_qkv is None

    def _attend(
        self,
        x: torch.Tensor,
        past_key_value: KVCache | None,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None,
        causal: bool,
        needs_weights: bool,
        needs_max_logit: bool,
        positions: torch.Tensor | None,
        cache: StaticLayerCache | None,
        qkv: torch.Tensor | None = None,
        project: bool = True,
        kv_written: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, KVCache]:
        """``qkv``: the projection of ``x``, made by the caller (fused with the norm before it);
        ``project=False``: return the context before ``out_proj`` (the caller fuses it with what
        follows); ``kv_written``: the caller's projection also wrote a decode step's keys and values
        into ``cache`` (only where they go in as projected: :attr:`kv_as_projected`)."""
        batch, q_len = self._check_input(x)
        if x.device.type not in self._device_backends:
            self._resolve_device(x.device)
        # One token into a static cache attends over every slot of it; anything else over what it
        # brings plus what a growing cache holds.
        decoding = cache is not None and q_len == 1
        key_padding_mask: torch.Tensor | None
        if cache is not None:
            if past_key_value is not None or mask is not None:
                raise ValueError("pass either a static cache or past_key_value/mask, not both: the cache has its mask")
            past_len = 0
            k_len = cache.owner.max_len if decoding else q_len
            key_padding_mask = cache.owner.key_mask if decoding else cache.owner.key_mask[:, :q_len]
            if not decoding and not cache.owner.prefill_masked:
                key_padding_mask = None
            if decoding and positions is None:  # no padding: a row's position is its slot
                positions = cache.owner.slot.expand(batch)[:, None]
        else:
            past_len = self._check_cache(past_key_value, batch, x)
            k_len = past_len + q_len
            key_padding_mask = self._check_mask(mask, batch, k_len, x.device)
        bias = self._crop_bias(bias, batch, q_len, k_len)

        if qkv is None:
            qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.kv_heads * self.head_dim
        q, k, v = qkv.split([self.dim, kv_dim, kv_dim], dim=-1)
        if self.qk_ln:
            q = self.q_ln(q).to(qkv.dtype)
            k = self.k_ln(k).to(qkv.dtype)
        q = q.view(batch, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            if positions is not None:
                self._check_positions(positions, batch, q_len)
                q, k = self.rotary.at(q, positions), self.rotary.at(k, positions)
            else:
                q = self.rotary(q, offset=past_len)
                k = self.rotary(k, offset=past_len)
        if cache is not None:
            if decoding and self.rotary is None and not self.qk_ln:
                # Keys and values as the projection made them: written by one copy from its output.
                if not kv_written:
                    packed = qkv[..., self.dim :].view(batch, 1, 2, self.kv_heads, self.head_dim)
                    cache.write_packed(packed.permute(0, 2, 3, 1, 4))
            else:
                cache.write(k, v)
            if decoding:
                k, v = cache.keys, cache.values
                q = q.to(k.dtype)
        elif past_key_value is not None:
            k = torch.cat([past_key_value[0].to(k.dtype), k], dim=2)
            v = torch.cat([past_key_value[1].to(v.dtype), v], dim=2)

        dropout_p = self.attn_pdrop if self.training else 0.0
        weights = max_logit = None
        if needs_weights:
            self._note(f"attn_impl={self._attn_impl!r}: needs_weights=True runs on the reference math path")
            context, weights = reference_attention(
                q,
                k,
                v,
                softmax_scale=self.softmax_scale,
                causal=causal and not decoding,
                bias=bias,
                key_padding_mask=key_padding_mask,
                dropout_p=dropout_p,
            )
            if needs_max_logit:
                max_logit = max_attention_logit(
                    q, k, softmax_scale=self.softmax_scale, causal=causal, key_padding_mask=key_padding_mask
                )
            used = "reference"
        elif decoding:
            assert cache is not None
            used, context = _decode_attention(q, k, v, key_padding_mask, bias, self.softmax_scale, cache.owner)
        else:
            kernel = self._kernels.get((q.device.type, q.dtype))
            if kernel is None:
                kernel = self._resolve_kernel(q.device, q.dtype)
            used, fn, call_check, note = kernel
            if note is not None:
                if self.verbose:
                    self._note(note)
            elif call_check is not None:
                reason = call_check(
                    q, k, causal=causal, bias=bias, key_padding_mask=key_padding_mask, dropout_p=dropout_p
                )
                if reason is not None:
                    self._note(f"attn_impl={self._attn_impl!r} falls back to 'torch': {reason}")
                    used, fn = "torch", _TORCH
            with sdpa_kernel(PREFILL_SDPA) if cache is not None and q.is_cuda else nullcontext():
                context = fn(
                    q,
                    k,
                    v,
                    softmax_scale=self.softmax_scale,
                    causal=causal,
                    bias=bias,
                    key_padding_mask=key_padding_mask,
                    dropout_p=dropout_p,
                )
        if self.verbose >= 2:
            log.info("MultiQueryAttention: %s kernel, q_len=%d k_len=%d dtype=%s", used, q_len, k_len, q.dtype)

        context = context.to(qkv.dtype).transpose(1, 2).reshape(batch, q_len, self.dim)
        return self.out_proj(context) if project else context, weights, max_logit, (k, v)

    def _note(self, message: str) -> None:
        if self.verbose >= 1 and message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=4)

    # ---- input checks: one clear error before any work ---------------------------------------

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, seq, {self.dim}], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [batch, seq, {self.dim}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        # Host-side attribute reads only. Under autocast the matmuls cast their inputs themselves.
        weight = getattr(self.Wqkv, "weight", None)
        if (
            isinstance(weight, torch.Tensor)
            and x.dtype != weight.dtype
            and weight.is_floating_point()
            and not torch.is_autocast_enabled(x.device.type)
        ):
            raise TypeError(
                f"x has dtype {x.dtype} but this MultiQueryAttention's weights are {weight.dtype}; pass "
                f"x.to({weight.dtype}), convert the module with .to({x.dtype}), or run under torch.autocast"
            )
        return x.shape[0], x.shape[1]

    def _check_cache(self, past_key_value: KVCache | None, batch: int, x: torch.Tensor) -> int:
        if past_key_value is None:
            return 0
        if not (isinstance(past_key_value, (tuple, list)) and len(past_key_value) == 2):
            raise TypeError("past_key_value must be a (key, value) pair as returned by a previous call")
        key, value = past_key_value
        for name, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"past_key_value {name} must be a tensor, got {type(t).__name__}")
        want = [batch, self.kv_heads, None, self.head_dim]
        for name, t in (("key", key), ("value", value)):
            if t.dim() != 4 or [s if w is not None else None for s, w in zip(t.shape, want)] != want:
                raise ValueError(
                    f"past_key_value {name} must have shape [batch={batch}, kv_heads={self.kv_heads}, "
                    f"past_len, head_dim={self.head_dim}], got {list(t.shape)}"
                )
        if key.shape != value.shape:
            raise ValueError(f"past key {list(key.shape)} and value {list(value.shape)} shapes differ")
        return key.shape[2]

    def _check_positions(self, positions: torch.Tensor, batch: int, q_len: int) -> None:
        if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex():
            raise TypeError(
                f"positions must be an integer tensor [batch, seq], got {getattr(positions, 'dtype', positions)!r}"
            )
        if tuple(positions.shape) != (batch, q_len):
            raise ValueError(f"positions must have shape [batch={batch}, seq={q_len}], got {list(positions.shape)}")

    def _check_mask(
        self, mask: torch.Tensor | None, batch: int, k_len: int, device: torch.device
    ) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(
                f"mask must be bool or integer (True/1 = attend), got dtype {mask.dtype}; "
                "pass an additive float mask as bias instead"
            )
        if tuple(mask.shape) != (batch, k_len):
            raise ValueError(
                f"mask must have shape [batch={batch}, keys={k_len}] (keys include cached positions), "
                f"got {list(mask.shape)}"
            )
        return mask.to(device=device, dtype=torch.bool)

    def _crop_bias(self, bias: torch.Tensor | None, batch: int, q_len: int, k_len: int) -> torch.Tensor | None:
        if bias is None:
            return None
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point additive tensor, got dtype {bias.dtype}")
        shape = list(bias.shape)
        if bias.dim() > 4 or bias.dim() == 0:
            raise ValueError(f"bias must be broadcastable to [batch, heads, queries, keys], got {shape}")
        bias = bias.reshape([1] * (4 - bias.dim()) + shape)
        b, h, rows, cols = bias.shape
        if (
            b not in (1, batch)
            or h not in (1, self.heads)
            or (rows != 1 and rows < q_len)
            or (cols != 1 and cols < k_len)
        ):
            raise ValueError(
                f"bias of shape {shape} does not broadcast to [batch={batch}, heads={self.heads}, "
                f"queries={q_len}, keys={k_len}] (longer query/key dims are cropped to the last entries)"
            )
        if rows > q_len:
            bias = bias[:, :, rows - q_len :, :]
        if cols > k_len:
            bias = bias[:, :, :, cols - k_len :]
        return bias


# SDPA's kernels for a prefill into a static cache, whose length is the prompt's and new from call to
# call: cuDNN, which SDPA picks on Hopper, builds a plan per shape (~42 ms at each new length on an
# H100, ~0.5 s in a machine's first process), where flash and memory-efficient take 0.07-0.2 ms.
PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    softmax_scale: float,
    cache: StaticKVCache,
) -> tuple[str, torch.Tensor]:
    """One query per row over a whole static cache: the Triton split-KV kernel, which stops at the
    slot, or SDPA over every slot with the key mask (the attention backends' causal prefill kernels
    have nothing to skip here)."""
    if cache.decode_attention == "triton":
        from mqa_lm.kernels.triton.decode import decode_attention, decode_attention_op

        if torch.compiler.is_compiling():  # traced as a torch.library op: no graph break
            out = decode_attention_op(q, keys, values, cache.lengths, key_mask, bias, softmax_scale, cache.split_size)
        else:
            # Called directly: the op's first eager call imports the compiler stack (4.3 s on an H200).
            out = decode_attention(
                q,
                keys,
                values,
                lengths=cache.lengths,
                key_mask=key_mask,
                bias=bias,
                softmax_scale=softmax_scale,
                split_size=cache.split_size,
                check=False,
            )
        return "triton decode", out
    return "sdpa decode", sdpa_attention(
        q, keys, values, softmax_scale=softmax_scale, causal=False, bias=bias, key_padding_mask=key_mask
    )


def max_attention_logit(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The largest pre-softmax logit ``softmax_scale * q.k`` per [batch, head], fp32, over the
    (query, key) pairs the mask lets attend; -inf for a head whose every row is masked.

    An additive bias (ALiBi) is left out: it is a fixed function of position whose per-row offset is
    arbitrary (softmax ignores it), while q.k is what grows when training goes unstable."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    q_grouped = q.float().reshape(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    scores = torch.einsum("bkgqd,bksd->bkgqs", q_grouped, k.float()).reshape(batch, heads, q_len, k_len)
    scores = scores * softmax_scale
    allowed = allowed_keys(q_len, k_len, causal, key_padding_mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.amax(dim=(-2, -1))


def check_attention_args(
    *,
    dim: int,
    heads: int,
    kv_heads: int,
    attn_impl: str,
    clip_qkv: float | None,
    softmax_scale: float | None,
    attn_pdrop: float,
    norm_type: str,
    fc_type: str,
    verbose: int,
    rope_theta: float | None = None,
    norm_eps: float = DEFAULT_EPS,
    names: Mapping[str, str] | None = None,
) -> None:
    """Raise ValueError/TypeError naming the first invalid attention argument.

    The one home of these checks: the block runs them at construction and ``MQAConfig`` runs them
    for the whole model. ``names`` maps an argument to how the message names it (``MQAConfig``
    passes ``{"dim": "model.d_model", "heads": "model.heads", ...}``); arguments it leaves out are
    named as themselves.
    """

    def name(arg: str) -> str:
        return names.get(arg, arg) if names else arg

    for arg, value in (("dim", dim), ("heads", heads), ("kv_heads", kv_heads)):
        check_int(value, name(arg))
    if dim % heads:
        raise ValueError(
            f"{name('dim')}={dim} is not divisible by {name('heads')}={heads}; "
            f"pick {name('heads')} that divides {name('dim')}"
        )
    if heads % kv_heads:
        raise ValueError(
            f"{name('heads')}={heads} is not divisible by {name('kv_heads')}={kv_heads}; "
            f"{name('kv_heads')} must divide {name('heads')} (1 = MQA, heads = MHA)"
        )
    ATTENTION_BACKENDS.get(attn_impl, name("attn_impl"))
    NORMS.get(norm_type, name("norm_type"))
    LINEARS.get(fc_type, name("fc_type"))
    if clip_qkv is not None and not clip_qkv > 0:
        raise ValueError(f"{name('clip_qkv')} must be > 0 (or None to disable), got {clip_qkv}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"{name('softmax_scale')} must be > 0 (or None for 1/sqrt(head_dim)), got {softmax_scale}")
    if not (isinstance(attn_pdrop, (int, float)) and 0.0 <= attn_pdrop < 1.0):
        raise ValueError(f"{name('attn_pdrop')} must be in [0, 1), got {attn_pdrop}")
    if verbose not in (0, 1, 2):
        raise ValueError(f"{name('verbose')} must be 0, 1 or 2, got {verbose!r}")
    if rope_theta is not None and not rope_theta > 0:
        raise ValueError(f"{name('rope_theta')} must be > 0, got {rope_theta}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not 0 < norm_eps < 1:
        raise ValueError(f"{name('norm_eps')} must be in (0, 1), got {norm_eps!r}")
