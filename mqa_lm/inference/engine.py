"""Fast generation for :class:`mqa_lm.model.MQATransformer`: a static KV cache, a fixed-shape decode
step captured in a CUDA graph, and sampling on the device.

Why: the training model's ``decode`` grows its cache with ``torch.cat`` and launches every kernel
from Python, so at batch 1 a step costs milliseconds of host time while the GPU idles. Here:

* Each layer owns a preallocated cache [batch, kv_heads, max_len, head_dim], written in place at
  the position held in a device tensor. The decode step has the same shapes at every position,
  so it is captured once as a CUDA graph and replayed; attention reads the cache up to the current
  length (the Triton split-KV kernel bounds its work by that length; the SDPA path masks the rest).
* Prompts of different lengths are left-padded: a key-padding mask hides the padding, and every
  row's positions (learned, RoPE, ALiBi) count from its first real token.
* The step samples its own next token from uniforms drawn up front, so the host only looks at the
  tokens every ``chunk`` steps (end-of-sequence check, streaming).

The prefill runs the prompt through the model's own attention backend (``attn_impl``), with the
blocks' modules and weights; only the QKV projection is restated here, because the block's
forward applies RoPE at one offset for the whole batch.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch

from mqa_lm.inference.sampling import check_sampling_args, sample_with_uniform
from mqa_lm.kernels import ATTENTION_BACKENDS, resolve_impl, sdpa_attention
from mqa_lm.nn.positions import alibi_slopes, apply_rotary

if TYPE_CHECKING:
    from mqa_lm.model import Block, MQATransformer
    from mqa_lm.nn.attention import MultiQueryAttention
    from mqa_lm.nn.positions import RotaryEmbedding

DECODE_ATTENTION = ("auto", "triton", "sdpa")
ENGINE_ENV = "MQA_LM_GENERATE_ENGINE"  # 0: generate() keeps the growing-cache loop
CUDA_GRAPH_ENV = "MQA_LM_CUDA_GRAPHS"  # 0: the engine runs its decode step eagerly on CUDA too

Settings = tuple[float, "int | None", "float | None", "int | None"]


def _blocks(model: MQATransformer) -> Iterable[Block]:
    """``model.blocks`` as what it holds: an nn.ModuleList types its items as plain Modules."""
    return cast("Iterable[Block]", model.blocks)


def _triton_decode_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    from mqa_lm.kernels.triton_backend import triton_importable, triton_interpreting

    if not triton_importable() or head_dim > 256:
        return False
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    # Not bf16 under the interpreter: it computes bf16 tiles wrongly.
    return device.type == "cpu" and triton_interpreting() and dtype in (torch.float32, torch.float16)


class InferenceEngine:
    """Generation for one model, batch size and cache length.

    Args:
        model: an :class:`MQATransformer` (held by a weak reference; its parameters must stay where
            they are while the engine lives: a CUDA graph has their addresses baked in).
        batch_size: rows per call.
        max_len: cache length: prompt (padding included) + new tokens - 1 must fit. At most
            ``model.config.max_seq_len`` (the positions the model was built for).
        attention: decode attention: ``triton`` (the split-KV kernel, reads keys up to the current
            length; CUDA fp16/bf16, or CPU under ``TRITON_INTERPRET=1``), ``sdpa`` (PyTorch SDPA
            over the whole cache with a mask), ``auto`` (triton where it runs, else sdpa).
        cuda_graph: capture the decode step in a CUDA graph (default: on CUDA unless autocast is
            on, whose cast caches a graph cannot replay; env ``MQA_LM_CUDA_GRAPHS=0`` turns it off).
        dtype: the cache dtype; default: the autocast dtype when autocast is on, else the dtype of
            the QKV projection's weight.
        split_size: keys per program of the Triton kernel (default: chosen from the shapes).
        keep_logits: also keep every step's fp32 logits in ``step_logits`` [max_len, batch, vocab]
            (row ``i`` produced new token ``i``): for tests and debugging, it costs a copy per step.
        compile: run the decode step through ``torch.compile`` (True: inductor, which fuses the
            norms, residual adds and sampling ops; a string names another backend), still inside
            the CUDA graph; the Triton decode kernel stays outside the compiled regions.
    """

    def __init__(
        self,
        model: MQATransformer,
        batch_size: int,
        max_len: int | None = None,
        *,
        attention: str = "auto",
        cuda_graph: bool | None = None,
        dtype: torch.dtype | None = None,
        split_size: int | None = None,
        keep_logits: bool = False,
        compile: bool | str = False,
    ) -> None:
        config = model.config
        if max_len is None:
            max_len = config.max_seq_len
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= config.max_seq_len:
            raise ValueError(
                f"max_len must be in [1, max_seq_len={config.max_seq_len}], got {max_len!r}; "
                "the model has positions for max_seq_len tokens"
            )
        if attention not in DECODE_ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; valid choices are: {', '.join(DECODE_ATTENTION)}")
        self._model = weakref.ref(model)
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        self.device = model.wte.weight.device
        device = self.device
        if dtype is None:
            if torch.is_autocast_enabled(device.type):
                dtype = torch.get_autocast_dtype(device.type)
            else:
                first = cast("Block", model.blocks[0])
                dtype = cast(torch.Tensor, first.attn.Wqkv.weight).dtype
        self.dtype = dtype
        triton_ok = _triton_decode_runs(device, dtype, config.head_dim)
        if attention == "triton" and not triton_ok:
            raise ValueError(
                f"attention='triton' needs Triton and CUDA fp16/bf16 (or TRITON_INTERPRET=1 on CPU), "
                f"here {device.type} {dtype}; use attention='sdpa'"
            )
        self.attention = "triton" if attention == "triton" or (attention == "auto" and triton_ok) else "sdpa"
        if cuda_graph is None:
            cuda_graph = (
                device.type == "cuda"
                and not torch.is_autocast_enabled(device.type)
                and os.environ.get(CUDA_GRAPH_ENV, "1") != "0"
            )
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {device}")
        # The warm-up runs before capture write at positions 0 and 1.
        self.cuda_graph = bool(cuda_graph) and max_len >= 4
        self.split_size = split_size

        # K and V of a layer share one buffer [batch, 2, kv_heads, max_len, head_dim], so that
        # without RoPE or QK-norm the new key and value are written by one copy straight from the
        # QKV projection's output. Each is still [batch, kv_heads, max_len, head_dim] with a unit
        # stride along head_dim, as the kernels and SDPA want.
        kv_shape = (batch_size, 2, config.kv_heads, max_len, config.head_dim)
        self.kv_caches = [torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.k_caches = [kv[:, 0] for kv in self.kv_caches]
        self.v_caches = [kv[:, 1] for kv in self.kv_caches]
        long: dict[str, Any] = dict(device=device, dtype=torch.long)
        self.key_mask = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.pad = torch.zeros(batch_size, **long)  # left-padding per row
        self.cur = torch.zeros(1, **long)  # position of the token the next step feeds
        self.base = torch.zeros(1, **long)  # prompt length - 1: cur - base indexes the new tokens
        self.token = torch.zeros(batch_size, **long)
        self.out = torch.zeros(batch_size, max_len, **long)
        self.uniforms = torch.zeros(max_len, batch_size, device=device, dtype=torch.float32)
        self.finished = torch.zeros(batch_size, device=device, dtype=torch.bool)
        self.key_pos = torch.arange(max_len, device=device, dtype=torch.float32)
        self.step_logits = (
            torch.zeros(max_len, batch_size, config.vocab_size, device=device, dtype=torch.float32)
            if keep_logits
            else None
        )
        self.slopes = alibi_slopes(config.heads).to(device) if config.pos_emb == "alibi" else None
        # The engine keeps the rotary tables it reads: a captured graph holds their addresses.
        self.rope = [
            block.attn.rotary.cos_sin(max_len, device, dtype) if block.attn.rotary is not None else None
            for block in _blocks(model)
        ]
        self._step_impl = self._decode_step
        if compile:
            self._step_impl = torch.compile(
                self._decode_step, backend="inductor" if compile is True else compile, dynamic=False
            )
        self._graphs: dict[Settings, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None
        self.fingerprint = parameter_fingerprint(model)

    @property
    def model(self) -> MQATransformer:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this InferenceEngine has been deleted")
        return model

    # ---- the layers ---------------------------------------------------------------------------

    def _qkv(self, layer: int, attn: MultiQueryAttention, h: torch.Tensor, positions: torch.Tensor):
        """Queries [b, heads, s, d] and keys/values [b, kv_heads, s, d] of ``h`` [b, s, dim] at
        per-row ``positions`` [b, s], as ``MultiQueryAttention.forward`` computes them; and, when
        keys and values leave the projection unchanged, both as one [b, 2, kv_heads, s, d] view."""
        batch, seq, _ = h.shape
        qkv = attn.Wqkv(h)
        if attn.clip_qkv is not None:
            qkv = qkv.clamp(min=-attn.clip_qkv, max=attn.clip_qkv)
        kv_dim = attn.kv_heads * attn.head_dim
        q, k, v = qkv.split([attn.dim, kv_dim, kv_dim], dim=-1)
        if attn.qk_ln:
            q = attn.q_ln(q).to(qkv.dtype)
            k = attn.k_ln(k).to(qkv.dtype)
        q = q.view(batch, seq, attn.heads, attn.head_dim).transpose(1, 2)
        k = k.view(batch, seq, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v = v.view(batch, seq, attn.kv_heads, attn.head_dim).transpose(1, 2)
        tables = self.rope[layer]
        kv = None
        if tables is not None:
            cos, sin = tables
            if cos.dtype != q.dtype:
                # rope[layer] is set exactly when the layer has a rotary embedding.
                cos, sin = cast("RotaryEmbedding", attn.rotary).cos_sin(self.max_len, q.device, q.dtype)
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        elif not attn.qk_ln:
            kv = qkv[..., attn.dim :].view(batch, seq, 2, attn.kv_heads, attn.head_dim).permute(0, 2, 3, 1, 4)
        return q, k, v, kv

    def _prefill(self, idx: torch.Tensor, prompt_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the prompt, fill the caches and the state; returns the last position's logits."""
        model = self.model
        batch, length = idx.shape
        device = self.device
        if prompt_mask is None:
            pad = torch.zeros(batch, device=device, dtype=torch.long)
        else:
            pad = length - prompt_mask.sum(dim=1)
        positions = (torch.arange(length, device=device)[None, :] - pad[:, None]).clamp_min(0)
        x = model.wte(idx)
        if model.wpe is not None:
            x = x + model.wpe(positions)
        bias = model.alibi_bias(device)
        if bias is not None:
            bias = bias[..., -length:]
        for i, block in enumerate(_blocks(model)):
            attn = block.attn
            q, k, v, _ = self._qkv(i, attn, block.norm_1(x), positions)
            self.k_caches[i][:, :, :length] = k
            self.v_caches[i][:, :, :length] = v
            context = _prefill_attention(attn, q, k, v, bias, prompt_mask)
            x = x + attn.out_proj(context.transpose(1, 2).reshape(batch, length, attn.dim))
            x = x + block.mlp(block.norm_2(x))
        logits = model.lm_head(model.norm_f(x[:, -1:]))[:, 0]

        self.key_mask.zero_()
        if prompt_mask is None:
            self.key_mask[:, :length] = True
        else:
            self.key_mask[:, :length] = prompt_mask
        self.pad.copy_(pad)
        self.cur.fill_(length)
        self.base.fill_(length - 1)
        self.finished.zero_()
        return logits

    def _decode_attention(self, attn: MultiQueryAttention, q, k_cache, v_cache, lengths, bias) -> torch.Tensor:
        if self.attention == "triton":
            return _triton_decode(
                q,
                k_cache,
                v_cache,
                lengths=lengths,
                key_mask=self.key_mask,
                bias=bias,
                softmax_scale=attn.softmax_scale,
                split_size=self.split_size,
                check=False,
            )
        return sdpa_attention(
            q,
            k_cache,
            v_cache,
            softmax_scale=attn.softmax_scale,
            causal=False,
            bias=bias,
            key_padding_mask=self.key_mask,
        )

    def _step(self, settings: Settings) -> None:
        """Feed ``token`` at position ``cur`` to every layer, sample the next token, advance.

        Only device tensors change between calls, and nothing here reads a value on the host, so
        this is what the CUDA graph captures.
        """
        self._step_impl(self.model, settings)

    def _decode_step(self, model: MQATransformer, settings: Settings) -> None:
        temperature, top_k, top_p, eos = settings
        batch, cur = self.batch_size, self.cur
        self.key_mask.index_fill_(1, cur, True)
        positions = (cur - self.pad)[:, None]
        lengths = (cur + 1).expand(batch)
        x = model.wte(self.token[:, None])
        if model.wpe is not None:
            x = x + model.wpe(positions)
        bias = None
        if self.slopes is not None:
            # -slope * distance to the current key, computed per step so that the entries that
            # matter stay near 0 in fp32 however long the cache.
            bias = (self.slopes[:, None] * (self.key_pos - cur)).view(1, -1, 1, self.max_len)
        for i, block in enumerate(_blocks(model)):
            attn = block.attn
            q, k, v, kv = self._qkv(i, attn, block.norm_1(x), positions)
            k_cache, v_cache = self.k_caches[i], self.v_caches[i]
            if kv is not None:
                self.kv_caches[i].index_copy_(3, cur, kv.to(k_cache.dtype))
            else:
                k_cache.index_copy_(2, cur, k.to(k_cache.dtype))
                v_cache.index_copy_(2, cur, v.to(v_cache.dtype))
            context = self._decode_attention(attn, q.to(k_cache.dtype), k_cache, v_cache, lengths, bias)
            x = x + attn.out_proj(context.to(x.dtype).transpose(1, 2).reshape(batch, 1, attn.dim))
            x = x + block.mlp(block.norm_2(x))
        logits = model.lm_head(model.norm_f(x))[:, 0]
        new_index = cur - self.base
        if self.step_logits is not None:
            self.step_logits.index_copy_(0, new_index, logits.float()[None])
        token = sample_with_uniform(logits, self.uniforms.index_select(0, new_index)[0], temperature, top_k, top_p)
        if eos is not None:
            token = torch.where(self.finished, eos, token)
            self.finished |= token == eos
        self.out.index_copy_(1, new_index, token[:, None])
        self.token.copy_(token)
        self.cur.add_(1)

    def _graph(self, settings: Settings) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get(settings)
        if graph is not None:
            return graph
        # Warm-up (compiles the Triton kernels, sets up cuBLAS) on a side stream, as capture
        # requires; it writes at positions 0..1, and the prefill that follows resets the state.
        self.key_mask.zero_()
        self.pad.zero_()
        self.cur.zero_()
        self.base.fill_(-1)
        self.token.zero_()
        self.finished.zero_()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(settings)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(settings)
        self._graphs[settings] = graph
        return graph

    # ---- generation ---------------------------------------------------------------------------

    def _check(self, idx: torch.Tensor, prompt_mask: torch.Tensor | None, max_new_tokens: int) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point() or idx.is_complex():
            raise ValueError(f"idx must be integer token ids [batch, seq], got {getattr(idx, 'dtype', type(idx))}")
        batch, length = idx.shape
        if batch != self.batch_size:
            raise ValueError(f"this engine was built for batch_size={self.batch_size}, got a batch of {batch}")
        if length == 0:
            raise ValueError("generate needs at least one prompt token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if length + max_new_tokens - 1 > self.max_len:
            raise ValueError(
                f"prompt of {length} tokens + {max_new_tokens} new tokens needs a cache of "
                f"{length + max_new_tokens - 1}, this engine has max_len={self.max_len}; build it with a larger max_len"
            )
        if idx.device != self.device:
            raise ValueError(f"idx is on {idx.device}, the model on {self.device}")
        if prompt_mask is not None:
            if tuple(prompt_mask.shape) != (batch, length) or prompt_mask.is_floating_point():
                raise ValueError(
                    f"prompt_mask must be bool [batch={batch}, seq={length}] (True = real token), "
                    f"got {prompt_mask.dtype} {list(prompt_mask.shape)}"
                )
            m = prompt_mask.bool()
            if not bool(m[:, -1].all()) or bool((m[:, 1:] < m[:, :-1]).any()):
                raise ValueError(
                    "prompt_mask must describe left padding: each row False...False then True...True, "
                    "ending in a real token (pad prompts on the left)"
                )

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        prompt_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        chunk: int = 16,
    ) -> Iterator[torch.Tensor]:
        """Yield the new tokens [batch, n] every ``chunk`` steps (and the rest at the end).

        ``idx`` [batch, seq] (left-padded where ``prompt_mask`` [batch, seq] is False). The host
        waits for the device only at those points. Rows that emitted ``eos_token_id`` keep emitting
        it; generation stops at the first chunk boundary where every row has.
        """
        self._check(idx, prompt_mask, max_new_tokens)
        check_sampling_args(temperature, top_k, top_p)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        if max_new_tokens == 0:
            return
        vocab = self.config.vocab_size
        settings: Settings = (
            float(temperature),
            int(top_k) if top_k is not None and top_k < vocab and temperature > 0 else None,
            float(top_p) if top_p is not None and top_p < 1.0 and temperature > 0 else None,
            int(eos_token_id) if eos_token_id is not None else None,
        )
        graph = None
        if self.cuda_graph:  # before the prefill: the warm-up overwrites the state (see _graph)
            try:
                graph = self._graph(settings)
            except RuntimeError as err:
                # A module that cannot be captured (e.g. a third-party linear): run eagerly.
                warnings.warn(f"InferenceEngine: CUDA graph capture failed, decoding eagerly: {err}", stacklevel=2)
                self.cuda_graph = False
        mask = prompt_mask.to(self.device, torch.bool) if prompt_mask is not None else None
        logits = self._prefill(idx.long(), mask)
        if temperature > 0:
            gen_device = generator.device if generator is not None else self.device
            drawn = torch.rand(max_new_tokens, self.batch_size, generator=generator, device=gen_device)
            self.uniforms[:max_new_tokens].copy_(drawn)
        if self.step_logits is not None:
            self.step_logits[0] = logits.float()
        token = sample_with_uniform(logits, self.uniforms[0], *settings[:3])
        if settings[3] is not None:
            self.finished |= token == settings[3]
        self.out[:, 0] = token
        self.token.copy_(token)

        produced, emitted = 1, 0
        while True:
            if produced - emitted >= chunk or produced == max_new_tokens:
                yield self.out[:, emitted:produced].clone()
                emitted = produced
                if produced == max_new_tokens or (settings[3] is not None and bool(self.finished.all())):
                    return
            if graph is not None:
                graph.replay()
            else:
                self._step(settings)
            produced += 1

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        prompt_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        chunk: int = 32,
    ) -> torch.Tensor:
        """``idx`` followed by the new tokens, as :meth:`MQATransformer.generate` returns them:
        when every row has emitted ``eos_token_id`` the result ends at the step where the last
        row did."""
        pieces = list(
            self.stream(
                idx,
                max_new_tokens,
                prompt_mask=prompt_mask,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_token_id=eos_token_id,
                generator=generator,
                chunk=chunk,
            )
        )
        if not pieces:
            return idx
        new = torch.cat(pieces, dim=1)
        if eos_token_id is not None:
            hit = new == eos_token_id
            if bool(hit.any(dim=1).all()):
                new = new[:, : int(hit.int().argmax(dim=1).max()) + 1]
        return torch.cat([idx, new.to(idx.device)], dim=1)


@torch.compiler.disable
def _triton_decode(*args, **kwargs) -> torch.Tensor:
    """The Triton decode kernel, called as is from a compiled step (a graph break, not a trace)."""
    from mqa_lm.kernels.triton_decode import decode_attention

    return decode_attention(*args, **kwargs)


def _prefill_attention(attn: MultiQueryAttention, q, k, v, bias, mask) -> torch.Tensor:
    """Causal attention of the prompt through the block's backend (``torch`` where it cannot)."""
    impl = resolve_impl(attn.attn_impl, q.device)
    kwargs = dict(causal=True, bias=bias, key_padding_mask=mask, dropout_p=0.0)
    backend = ATTENTION_BACKENDS.get(impl)
    if impl != "torch" and backend.unsupported(q, k, **kwargs) is not None:
        backend = ATTENTION_BACKENDS.get("torch")
    return backend(q, k, v, softmax_scale=attn.softmax_scale, **kwargs)


def parameter_fingerprint(model: torch.nn.Module) -> tuple:
    """Where and how the parameters live: an engine built for other addresses must not be reused."""
    return tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())


# ---- MQATransformer.generate's fast path ------------------------------------------------------

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINES_PER_MODEL = 2  # each holds a whole cache; a few shapes in turn (training samples) fit


def cache_length(needed: int, max_seq_len: int) -> int:
    """The cache length an engine gets for ``needed`` positions: a power of two (at least 64),
    so a handful of engines serve every call, capped at ``max_seq_len``."""
    return min(max_seq_len, max(64, 1 << max(needed - 1, 0).bit_length()))


def engine_generate(
    model: MQATransformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor | None:
    """``model.generate`` through a cached :class:`InferenceEngine`, or None where the engine does
    not apply (the context would slide past ``max_seq_len``, dropout is active, bad inputs whose
    error the plain path raises, or env ``MQA_LM_GENERATE_ENGINE=0``)."""
    if os.environ.get(ENGINE_ENV, "1") == "0":
        return None
    config = model.config
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point() or idx.is_complex():
        return None
    batch, length = idx.shape
    needed = length + max_new_tokens - 1
    if max_new_tokens < 1 or length < 1 or needed > config.max_seq_len:
        return None
    if model.training and max(config.attn_pdrop, config.resid_pdrop, config.emb_pdrop) > 0:
        return None
    device = model.wte.weight.device
    if idx.device != device:
        return None
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    # Buffers made under inference_mode cannot be updated in place outside it (Lightning runs
    # validation hooks, and so training-time samples, under inference_mode).
    key = (device, batch, cache_length(needed, config.max_seq_len), autocast, torch.is_inference_mode_enabled())
    engines = _ENGINES.setdefault(model, {})
    engine = engines.get(key)
    if engine is None or engine.fingerprint != parameter_fingerprint(model):
        engines.pop(key, None)
        while len(engines) >= _ENGINES_PER_MODEL:
            engines.pop(next(iter(engines)))
        engine = InferenceEngine(model, batch, key[2])
        engines[key] = engine
    return engine.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        generator=generator,
    )


def clear_engines(model: MQATransformer) -> None:
    """Drop the engines (caches, CUDA graphs) ``generate`` keeps for ``model``."""
    _ENGINES.pop(model, None)


__all__ = ["InferenceEngine", "cache_length", "clear_engines", "engine_generate"]
