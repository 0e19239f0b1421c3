"""KV caches for :class:`~mqa_lm.model.MQATransformer`: the growing one of the block API, and a static
one written in place, which generation (and its CUDA graph) uses.

* :class:`DynamicKVCache`: each layer's ``(key, value)`` as :class:`MultiQueryAttention` returns them,
  concatenated call after call. Any batch, any length; the cached length is known on the host.
* :class:`StaticKVCache`: preallocated K/V of fixed shape per layer, a key mask and the next free
  slot held in a device tensor. A call of one token per row writes at that slot and attends over the
  whole buffer through the mask, with the same shapes at every step, so a CUDA graph captured once
  replays for every position. A call of several tokens is a prefill: it fills slots ``0..n-1`` of an
  empty cache (:meth:`StaticKVCache.reset` first), and attends causally among its own tokens.

Slots are columns of the batch: a left-padded prompt row has padding in its first slots, which the key
mask hides; the model's positions count from each row's first real token (the caller passes them).
"""

from __future__ import annotations

import torch

from mqa_lm.utils.config import check_int

KVPair = tuple[torch.Tensor, torch.Tensor]
DECODE_ATTENTION = ("auto", "triton", "sdpa")


class DynamicKVCache:
    """Each layer's ``(key [batch, kv_heads, len, head_dim], value)``, grown by concatenation.

    Pass it to ``MQATransformer.forward(idx, cache=...)`` call after call: the new tokens are placed
    after the cached ones (positions ``length ..``) and the cache is updated in place.
    """

    def __init__(self) -> None:
        self.layers: list[KVPair] = []

    @property
    def length(self) -> int:
        """Tokens cached so far (0 before the first call)."""
        return self.layers[0][0].shape[2] if self.layers else 0

    def layer(self, i: int) -> KVPair | None:
        return self.layers[i] if i < len(self.layers) else None

    def update(self, i: int, present: KVPair) -> None:
        if len(self.layers) <= i:
            self.layers.append(present)
        else:
            self.layers[i] = present


class StaticLayerCache:
    """One layer's view of a :class:`StaticKVCache`: its K/V buffers and the shared mask and slot."""

    def __init__(self, owner: StaticKVCache, kv: torch.Tensor) -> None:
        self.owner = owner
        self.kv = kv  # [batch, 2, kv_heads, max_len, head_dim]
        self.keys = kv[:, 0]
        self.values = kv[:, 1]

    def write_packed(self, kv: torch.Tensor) -> None:
        """Store one token's keys and values given as one tensor [batch, 2, kv_heads, 1, head_dim] (a view
        of the QKV projection's output when nothing transforms them): one copy instead of two."""
        self.kv.index_copy_(3, self.owner.slot, kv.detach().to(self.kv.dtype))

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new keys/values [batch, kv_heads, seq, head_dim]: a prefill at slots ``0..seq-1``,
        one token at the slot held on the device."""
        seq = k.shape[2]
        # Detached: a static cache serves inference and keeps no autograd history.
        k, v = k.detach().to(self.keys.dtype), v.detach().to(self.values.dtype)
        if seq == 1:
            slot = self.owner.slot
            self.keys.index_copy_(2, slot, k)
            self.values.index_copy_(2, slot, v)
        else:
            self.keys[:, :, :seq] = k
            self.values[:, :, :seq] = v


class StaticKVCache:
    """Preallocated K/V for every layer, with a key mask [batch, max_len] and the next slot (a device
    tensor [1]), so that decoding one token has the same shapes, and the same tensors, at every step.

    Args:
        n_layers, batch_size, kv_heads, head_dim: the model's and the batch's sizes.
        max_len: slots per row; at most the model's ``max_seq_len``.
        device, dtype: where and in what dtype K and V are kept.
        decode_attention: the kernel one-token calls use: ``triton`` (the split-KV kernel of
            :mod:`mqa_lm.kernels.triton.decode`, which reads keys only up to the slot), ``sdpa``
            (PyTorch SDPA over the whole buffer with the mask) or ``auto`` (triton where it runs).
        split_size: keys per program of the Triton kernel (default: from the shapes).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        decode_attention: str = "auto",
        split_size: int | None = None,
    ) -> None:
        check_int(batch_size, "batch_size")
        check_int(max_len, "max_len")
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(
                f"unknown decode_attention {decode_attention!r}; valid choices are: {', '.join(DECODE_ATTENTION)}"
            )
        device = torch.device(device)
        triton_ok = triton_decode_runs(device, dtype, head_dim)
        if decode_attention == "triton" and not triton_ok:
            raise ValueError(
                f"decode_attention='triton' needs Triton and CUDA fp16/bf16 (or TRITON_INTERPRET=1 and fp32/fp16 "
                f"on CPU), here {device.type} {dtype}; use 'sdpa'"
            )
        self.decode_attention = "triton" if decode_attention != "sdpa" and triton_ok else "sdpa"
        # With the Triton decode kernel, a block's linear layers in a one-token step run as Triton
        # kernels with the norms, biases, activation and residual adds fused in
        # (mqa_lm.kernels.triton.decode_linear); a public switch for comparing the two.
        self.fused_layers = self.decode_attention == "triton"
        self.split_size = split_size
        self.batch_size = batch_size
        self.max_len = max_len
        self.device = device
        self.dtype = dtype
        # K and V of a layer share one buffer so that each is [batch, kv_heads, max_len, head_dim] with
        # a unit stride along head_dim, as the kernels and SDPA want.
        shape = (batch_size, 2, kv_heads, max_len, head_dim)
        self.layers = [StaticLayerCache(self, torch.zeros(shape, device=device, dtype=dtype)) for _ in range(n_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.prefill_masked = True  # whether a prefill attends through key_mask (reset() decides)
        self.slot = torch.zeros(1, device=device, dtype=torch.long)
        self.slots = torch.arange(max_len, device=device)
        self.lengths = (self.slot + 1).expand(batch_size)
        # How many slots are filled, as far as the host knows: set by reset() and a prefill, unknown
        # (None) once one-token steps ran, which may have been replayed by a CUDA graph.
        self.host_length: int | None = 0

    def reset(self, prompt_mask: torch.Tensor | None = None, length: int | None = None) -> None:
        """Empty the cache before a prefill of ``length`` tokens; ``prompt_mask`` [batch, length] (True
        = a real token) hides left padding. Device-side writes only (a graph may capture them).

        With ``length`` alone (no padding), the prefill's attention takes no key mask: plain causal
        attention, which SDPA runs on its flash kernel (a mask, even an all-true one, rules it out)."""
        self.prefill_masked = prompt_mask is not None or length is None
        self.key_mask.zero_()
        if prompt_mask is not None:
            self.key_mask[:, : prompt_mask.shape[1]] = prompt_mask
        elif length is not None:
            self.key_mask[:, :length] = True
        self.slot.zero_()
        self.host_length = 0

    def begin(self, seq: int) -> None:
        """Before the layers run ``seq`` new tokens: checks, and the new slot made visible."""
        if seq == 1:
            self.key_mask.index_fill_(1, self.slot, True)
            # Slots to read per row for this token (the Triton kernel's bound) [batch]: once per
            # step, not once per layer.
            self.lengths = (self.slot + 1).expand(self.batch_size)
            return
        if self.host_length != 0:
            raise ValueError(
                f"a StaticKVCache takes several tokens ({seq}) only as a prefill into an empty cache; call "
                "reset() first, or feed one token per call after the prefill"
            )
        if seq > self.max_len:
            raise ValueError(f"a prefill of {seq} tokens does not fit the cache's max_len={self.max_len}")

    def end(self, seq: int) -> None:
        """After the layers ran ``seq`` new tokens: advance the slot."""
        self.slot.add_(seq)
        self.host_length = seq if seq > 1 else None

    def decode_bias(self, slopes: torch.Tensor) -> torch.Tensor:
        """ALiBi for the one token at ``slot`` over every slot: ``-slope * distance`` [1, heads, 1, max_len].

        Slots and positions differ by a row's padding, which cancels in a distance. Computed per step
        so that the entries that matter stay near 0 in fp32 however long the cache; later slots are
        masked anyway."""
        distance = (self.slot - self.slots).clamp_min(0).to(torch.float32)
        return (-slopes[:, None] * distance[None, :]).view(1, -1, 1, self.max_len)


def triton_decode_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the Triton decode kernel can run on ``device`` tensors of ``dtype``."""
    from mqa_lm.kernels.triton_backend import triton_runs_on

    if head_dim > 256 or not triton_runs_on(device):
        return False
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    return dtype in (torch.float32, torch.float16)  # the interpreter computes bf16 tiles wrongly
