"""Generation for :class:`mqa_lm.model.MQATransformer`: the model's own forward over a static KV cache,
a decode step captured in a CUDA graph, sampling on the device, and a named rule past the context.

The engine holds no model math: the prefill and every step are ``model(ids, positions=..., cache=...)``
over a :class:`~mqa_lm.nn.cache.StaticKVCache`. What it owns:

* the cache and the per-row state (left padding, the token to feed, the tokens of the current round);
* the decode step (forward of one token per row, then sampling from uniforms drawn up front),
  captured once per sampling setting as a CUDA graph and replayed, optionally compiled by Inductor;
* rounds of at most ``chunk`` steps: the host looks at the tokens only between rounds (streaming,
  end of sequence), never inside one;
* what happens when the cache is full (``context_overflow``): ``slide`` re-prefills the last half
  window of every row in one batched call and carries on, so each prediction sees between half and all
  of the window computed from position 0 as in training; ``crop`` recomputes, for every new token, the
  last ``max_len`` tokens as one fixed-shape forward (exactly nanoGPT's crop, also as a CUDA graph);
  ``error`` refuses before any work.

Prompts of different lengths are left-padded: the key mask hides the padding and every row's positions
count from its first real token. A given generator seed gives the same uniforms, and so the same tokens,
whatever the prompt length, rule or chunking.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from mqa_lm.inference.config import GenerationConfig
from mqa_lm.inference.sampling import sample_with_uniform
from mqa_lm.inference.warmup import wait_for_device_warmup
from mqa_lm.nn.cache import DECODE_ATTENTION
from mqa_lm.utils.config import check_int

if TYPE_CHECKING:
    from mqa_lm.model import MQATransformer

# (temperature, top_k, top_p, eos): what the captured step bakes in (InferenceEngine.settings builds it).
Settings = tuple[float, "int | None", "float | None", "int | None"]

# Steps per streamed round: how often the host sees the tokens (printing, end-of-sequence and stop
# checks) when streaming; a non-streaming generate() runs rounds as long as the round buffer holds.
STREAM_CHUNK = 8


class InferenceEngine:
    """Generation for one model, batch size and cache length.

    Args:
        model: an :class:`MQATransformer` (held by a weak reference; its parameters must stay where
            they are while the engine lives: a CUDA graph has their addresses baked in).
        batch_size: rows per call.
        max_len: cache slots, the window the model sees (default and at most ``max_seq_len``). Past it
            ``context_overflow`` applies.
        attention: decode attention: ``triton`` (the split-KV kernel, which reads keys up to the
            current slot; CUDA fp16/bf16, or CPU under ``TRITON_INTERPRET=1``), ``sdpa`` (PyTorch SDPA
            over the whole cache with a mask), ``auto`` (triton where it runs, else sdpa).
        cuda_graph: capture the steps in CUDA graphs (default: on CUDA unless autocast is on, whose
            cast caches a graph cannot replay).
        dtype: the cache dtype; default: the autocast dtype when autocast is on, else the weights'.
        split_size: keys per program of the Triton kernel (default: chosen from the shapes).
        keep_logits: keep every new token's logits (fp32; fp64 for an fp64 model) in ``step_logits``
            [new tokens, batch, vocab] (row ``i`` produced new token ``i``): for tests and debugging.
        compile: run the decode step through ``torch.compile`` (True: Inductor, which fuses the norms,
            residual adds, rotary and sampling; a string names another backend), inside the graph.
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
        check_int(batch_size, "batch_size")
        if attention not in DECODE_ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; valid choices are: {', '.join(DECODE_ATTENTION)}")
        self.cache = model.static_cache(
            batch_size, max_len, dtype=dtype, decode_attention=attention, split_size=split_size
        )
        self._model = weakref.ref(model)
        self.config = model.config
        self.batch_size = batch_size
        self.max_len = self.cache.max_len
        self.device = self.cache.device
        self.dtype = self.cache.dtype
        self.attention = self.cache.decode_attention
        device = self.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda" and not torch.is_autocast_enabled(device.type)
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {device}")
        # The warm-up runs before capture write at slots 0 and 1.
        self.cuda_graph = bool(cuda_graph) and self.max_len >= 4
        self.keep_logits = keep_logits

        long: dict[str, Any] = dict(device=device, dtype=torch.long)
        self.pad = torch.zeros(batch_size, **long)  # left padding per row
        self.token = torch.zeros(batch_size, **long)  # the token the next step feeds
        self.finished = torch.zeros(batch_size, device=device, dtype=torch.bool)
        self.step = torch.zeros(1, **long)  # index of the next token within the round
        self.chunk_capacity = 64
        self.out = torch.zeros(batch_size, self.chunk_capacity, **long)
        self.uniforms = torch.zeros(self.chunk_capacity, batch_size, device=device, dtype=torch.float32)
        self.round_logits = (
            torch.zeros(
                self.chunk_capacity,
                batch_size,
                self.config.vocab_size,
                device=device,
                dtype=torch.promote_types(self.dtype, torch.float32),
            )
            if keep_logits
            else None
        )
        self._logits: list[torch.Tensor] = []
        # crop: the last max_len tokens of every row (with their padding), what each crop step reads.
        self.window = torch.zeros(batch_size, self.max_len, **long)
        self.window_mask = torch.zeros(batch_size, self.max_len, device=device, dtype=torch.bool)
        self.slots = torch.arange(self.max_len, **long)

        # Wrapped at the first decode step (_decode_fn), not here: torch.compile imports the compiler
        # stack (seconds), which must not delay the first token, the prefill's.
        self.compile = compile
        self._decode_impl: Callable[[Settings], None] | None = None if compile else self._decode_step
        self._graphs: dict[tuple[str, Settings], torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0  # spent warming up and capturing graphs (reported apart from decoding)
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None
        self.fingerprint = parameter_fingerprint(model)
        self._warmup: threading.Thread | None = None
        self._warmup_started = False

    def _start_decode_kernel_warmup(self) -> None:
        """Run the Triton decode kernels once (the attention, and the fused linear layers of
        :meth:`~mqa_lm.model.Block.fused_layers`), at this engine's shapes, on a background thread that the
        prefill overlaps (started by the first call that will decode). A process's first launch of a
        Triton kernel costs ~0.5 s of host work even when Triton's disk cache holds the binary (hashing
        Triton's own sources and library for the cache key, importing its backend, loading the
        binary): paid here, it no longer stalls the first decode step, which waits for the thread
        (:meth:`_await_warmup`)."""
        if self._warmup_started or self.device.type != "cuda" or self.attention != "triton":
            return
        self._warmup_started = True
        # Not a daemon: a process that ends before its first decode step waits for it at exit rather
        # than tearing CUDA down under a launch.
        self._warmup = threading.Thread(target=self._warm_decode_kernel, name="mqa-decode-warmup")
        self._warmup.start()

    def _warm_decode_kernel(self) -> None:
        """The warm-up thread's work: each decode kernel variant the step launches, once, the
        variants side by side on threads of their own. Triton's compiler releases the GIL for most of
        its work, so a first process on a machine, which compiles them all, waits for the longest
        one rather than for their sum (five fused-layer variants compiled for sm_90 on a 2-core CPU:
        3.4 s one after another, 2.4 s side by side)."""
        calls = self._quietly(lambda: self.model.fused_decode_launches(self.cache)) or []
        if calls:
            # Alone first: a kernel's first launch in a process sets up its per-device state, which
            # the others then share.
            self._quietly(calls[0])
        threads = [self._start_thread(self._warm_attention)]
        threads += [self._start_thread(call) for call in calls[1:]]
        for thread in threads:
            thread.join()

    def _quietly(self, work: Callable[[], Any]) -> Any:
        """``work()`` on this engine's device without autograd (both are per thread), or None where it
        fails: the decode step's own call reports any real problem."""
        try:
            with torch.no_grad(), torch.cuda.device(self.device):
                return work()
        except Exception:  # noqa: BLE001
            return None

    def _start_thread(self, work: Callable[[], Any]) -> threading.Thread:
        thread = threading.Thread(target=self._quietly, args=(work,), name="mqa-decode-warmup")
        thread.start()
        return thread

    def _warm_attention(self) -> None:
        # Inputs laid out as the decode step's (strides and dtypes pick the compiled variant), on
        # tensors of their own: the prefill is writing the real cache meanwhile.
        from mqa_lm.kernels.triton.decode import decode_attention

        cache, config = self.cache, self.config
        kv = torch.zeros_like(cache.layers[0].kv)
        batch, _, _, max_len, head_dim = kv.shape
        q = torch.zeros(batch, config.heads, 1, head_dim, device=self.device, dtype=kv.dtype)
        bias = None
        if config.pos_emb == "alibi":
            bias = torch.zeros(1, config.heads, 1, max_len, device=self.device, dtype=torch.float32)
        decode_attention(
            q,
            kv[:, 0],
            kv[:, 1],
            lengths=torch.ones(1, device=self.device, dtype=torch.long).expand(batch),
            key_mask=torch.ones_like(cache.key_mask),
            bias=bias,
            split_size=cache.split_size,
            check=False,
        )

    def _await_warmup(self) -> None:
        if self._warmup is not None:
            self._warmup.join()
            self._warmup = None

    @property
    def model(self) -> MQATransformer:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this InferenceEngine has been deleted")
        return model

    @property
    def step_logits(self) -> torch.Tensor:
        """The fp32 logits of every new token of the last call [new tokens, batch, vocab] (``keep_logits``)."""
        if not self.keep_logits:
            raise RuntimeError("build the engine with keep_logits=True to keep the logits")
        return torch.cat(self._logits) if self._logits else torch.zeros(0, self.batch_size, self.config.vocab_size)

    # ---- the steps: the model's forward over the cache, then sampling ----------------------------

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, padded: bool = True) -> torch.Tensor:
        """Fill an emptied cache with ``ids`` [batch, n] (left-padded where ``mask`` is False); returns
        the last position's logits [batch, vocab]. ``padded=False`` (the caller knows ``mask`` is all
        true) lets the attention run without a key mask.

        ``ids`` and ``mask`` on the host (a prompt, as :meth:`stream` passes it): the padding and the
        positions are counted there and copied over, so a process's first token does not wait for the
        first launches of the kernels that would count them on the device (~0.05 s on an H100). On
        the device (the crop step, which a CUDA graph captures), everything stays there."""
        width = ids.shape[1]
        slots = self.slots[:width] if ids.device == self.device else torch.arange(width)
        pad = width - mask.sum(dim=1)
        positions = (slots[None, :] - pad[:, None]).clamp_min(0)
        self.cache.reset(mask.to(self.device) if padded else None, length=width)
        self.pad.copy_(pad)
        logits, _ = self.model(
            ids.to(self.device), positions=positions.to(self.device), cache=self.cache, logits_to_keep=1
        )
        assert logits is not None
        return logits[:, -1]

    def _decode_step(self, settings: Settings) -> None:
        """Feed ``token`` to every row at its position, sample the next token. Only device tensors
        change between calls and nothing reads a value on the host: what the CUDA graph captures."""
        positions = (self.cache.slot - self.pad)[:, None]
        logits, _ = self.model(self.token[:, None], positions=positions, cache=self.cache, logits_to_keep=1)
        assert logits is not None
        self._sample(logits[:, -1], settings)

    def _crop_step(self, settings: Settings) -> None:
        """nanoGPT's crop as a fixed-shape step: the last ``max_len`` tokens of every row (``window``)
        through the model from position 0, sample, then shift the new token into the window."""
        logits = self._prefill(self.window, self.window_mask)
        self._sample(logits, settings)
        self.window.copy_(torch.cat([self.window[:, 1:], self.token[:, None]], dim=1))
        self.window_mask.copy_(torch.cat([self.window_mask[:, 1:], self.window_mask.new_ones(self.batch_size, 1)], 1))

    def _sample(self, logits: torch.Tensor, settings: Settings, first: bool = False) -> None:
        """Sample the round's next token into ``out`` and ``token``. ``first``: the round's first token
        (a prefill's), written by plain slices; the decode step, which a graph replays, finds its place
        in the round from ``step`` on the device."""
        temperature, top_k, top_p, eos = settings
        uniform = self.uniforms[0] if first else self.uniforms.index_select(0, self.step)[0]
        if self.round_logits is not None:
            kept = logits.to(self.round_logits.dtype)
            if first:
                self.round_logits[0] = kept
            else:
                self.round_logits.index_copy_(0, self.step, kept[None])
        token = sample_with_uniform(logits, uniform, temperature, top_k, top_p)
        if eos is not None:
            token = torch.where(self.finished, eos, token)
            self.finished |= token == eos
        if first:
            self.out[:, 0] = token
            self.step.fill_(1)
        else:
            self.out.index_copy_(1, self.step, token[:, None])
            self.step.add_(1)
        self.token.copy_(token)

    def _decode_fn(self) -> Callable[[Settings], None]:
        """The decode step, through ``torch.compile`` when the engine was built with ``compile``."""
        if self._decode_impl is None:
            backend = "inductor" if self.compile is True else str(self.compile)
            self._decode_impl = torch.compile(self._decode_step, backend=backend, dynamic=False)
        return self._decode_impl

    def _run(self, kind: str, settings: Settings) -> None:
        """One decode or crop step: a graph replay where graphs are on, else eagerly."""
        # Before a capture, which no other thread's launch may interleave.
        self._await_warmup()
        wait_for_device_warmup()
        if self.cuda_graph and (kind, settings) not in self._graphs:
            self._capture(kind, settings)
        graph = self._graphs.get((kind, settings)) if self.cuda_graph else None
        if graph is not None:
            graph.replay()
        elif kind == "decode":
            self._decode_fn()(settings)
        else:
            self._crop_step(settings)

    def _capture(self, kind: str, settings: Settings) -> None:
        """Capture the step of ``kind`` for ``settings``, in the middle of a generation: the first
        token is already out, so capturing costs no time to first token. The warm-up runs the step
        for real, so the state it changes is saved and put back; the cache slots it writes lie past the
        current one, where the key mask hides them until their own step overwrites them."""
        step = self._decode_fn() if kind == "decode" else self._crop_step
        state = [self.pad, self.token, self.finished, self.step, self.out, self.window, self.window_mask]
        state += [self.cache.key_mask, self.cache.slot]
        if self.round_logits is not None:
            state.append(self.round_logits)
        saved = [t.clone() for t in state]
        host_length = self.cache.host_length
        started = time.perf_counter()
        # Warm-up (compiles Triton kernels, sets up cuBLAS) on a side stream, as capture requires.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    step(settings)
                    for tensor, value in zip(state, saved):
                        tensor.copy_(value)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                step(settings)
        except RuntimeError as err:
            # A module that cannot be captured (e.g. a third-party linear): run eagerly from now on.
            warnings.warn(f"InferenceEngine: CUDA graph capture failed, decoding eagerly: {err}", stacklevel=3)
            self.cuda_graph = False
        else:
            self._graphs[(kind, settings)] = graph
        finally:
            for tensor, value in zip(state, saved):
                tensor.copy_(value)
            self.cache.host_length = host_length
            torch.cuda.synchronize(self.device)
            self.capture_seconds += time.perf_counter() - started

    # ---- generation ---------------------------------------------------------------------------

    def _check(
        self, idx: torch.Tensor, prompt_mask: torch.Tensor | None, max_new_tokens: int, context_overflow: str
    ) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point() or idx.is_complex():
            raise ValueError(f"idx must be integer token ids [batch, seq], got {getattr(idx, 'dtype', type(idx))}")
        batch, length = idx.shape
        if batch != self.batch_size:
            raise ValueError(f"this engine was built for batch_size={self.batch_size}, got a batch of {batch}")
        if length == 0:
            raise ValueError("generate needs at least one prompt token")
        if context_overflow == "error" and length + max_new_tokens - 1 > self.max_len:
            raise ValueError(
                f"prompt of {length} tokens + {max_new_tokens} new tokens needs a window of "
                f"{length + max_new_tokens - 1}, past this engine's max_len={self.max_len} "
                f"(context_overflow='error'); generate fewer tokens, or pass context_overflow='slide' or 'crop'"
            )
        if idx.device != self.device and idx.device.type != "cpu":
            raise ValueError(f"idx is on {idx.device}, the model on {self.device}; pass it on either that or the CPU")
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

    def settings(self, config: GenerationConfig, eos_token_id: int | None) -> Settings:
        """What the captured step bakes in, from ``config``: top-k and top-p only where they cut
        (greedy needs neither), and the end-of-sequence id (None: rows never stop early)."""
        temperature = config.temperature
        top_k, top_p = config.top_k, config.top_p
        return (
            temperature,
            int(top_k) if top_k is not None and top_k < self.config.vocab_size and temperature > 0 else None,
            top_p if top_p is not None and top_p < 1.0 and temperature > 0 else None,
            int(eos_token_id) if eos_token_id is not None else None,
        )

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        config: GenerationConfig,
        *,
        prompt_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        chunk: int = STREAM_CHUNK,
    ) -> Iterator[torch.Tensor]:
        """Yield the new tokens [batch, n] (on the CPU) every ``chunk`` steps (and the rest at the end).

        ``idx`` [batch, seq] (left-padded where ``prompt_mask`` [batch, seq] is False), on the engine's
        device or on the CPU (cheaper: the prompt's checks and positions then need no device work
        before the first token); ``config``'s
        ``max_new_tokens``, sampling settings and ``context_overflow`` (its ``stop_at_eos`` and
        ``seed`` are the caller's: they become ``eos_token_id`` and ``generator``). The host waits for
        the device only at those points. Rows that emitted ``eos_token_id`` keep emitting it;
        generation stops at the first chunk boundary where every row has. Past ``max_len`` tokens
        ``context_overflow`` decides (see the module docstring).
        """
        if not isinstance(config, GenerationConfig):
            raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
        max_new_tokens, context_overflow = config.max_new_tokens, config.context_overflow
        self._check(idx, prompt_mask, max_new_tokens, context_overflow)
        check_int(chunk, "chunk")
        chunk = min(chunk, self.chunk_capacity)
        self._logits = []
        if max_new_tokens == 0:
            return
        if max_new_tokens > 1:  # one token is the prefill's alone: no decode kernel to warm
            self._start_decode_kernel_warmup()
        settings = self.settings(config, eos_token_id)
        temperature = settings[0]
        batch, width = idx.shape
        full, half = self.max_len, max(1, self.max_len // 2)
        # Every row's tokens so far, left-padded as given, on the host: what a re-prefill or a crop
        # window is cut from (between rounds, when the host has the tokens anyway).
        history = torch.zeros(batch, width + max_new_tokens, dtype=torch.long)
        history[:, :width] = idx.detach().cpu()
        real = torch.ones(batch, width + max_new_tokens, dtype=torch.bool)
        if prompt_mask is not None:
            real[:, :width] = prompt_mask.detach().cpu()
        length = width
        uniforms = None
        if temperature > 0:
            gen_device = generator.device if generator is not None else self.device
            uniforms = torch.rand(max_new_tokens, batch, generator=generator, device=gen_device)
        self.finished.zero_()

        produced, filled = 0, None  # filled: cache slots in use, None before the first prefill
        while produced < max_new_tokens:
            # The first round is the prefill's token alone: it reaches the caller at once.
            n = 1 if filled is None else min(chunk, max_new_tokens - produced)
            self.step.zero_()
            if uniforms is not None:
                self.uniforms[:n].copy_(uniforms[produced : produced + n])
            done = 0
            if filled is None or (filled >= full and context_overflow == "slide"):
                # A prefill: the prompt (its last max_len columns), or the last half window.
                keep = min(full if filled is None else half, length)
                window = slice(length - keep, length)
                rows_real = real[:, window]  # on the host: whether any row is padded costs no sync
                logits = self._prefill(history[:, window], rows_real, padded=not bool(rows_real.all()))
                self._sample(logits, settings, first=True)
                filled, done = keep, 1
            if filled >= full and context_overflow == "crop":
                if done < n:
                    self.window.copy_(history[:, length - full : length].to(self.device))
                    self.window_mask.copy_(real[:, length - full : length].to(self.device))
                    if done:  # the token just sampled from the prefill enters the window first
                        self.window.copy_(torch.cat([self.window[:, 1:], self.token[:, None]], dim=1))
                        self.window_mask.copy_(torch.cat([self.window_mask[:, 1:], self.window_mask[:, :1] | True], 1))
                for _ in range(n - done):
                    self._run("crop", settings)
            else:
                steps = min(n - done, full - filled)
                for _ in range(steps):
                    self._run("decode", settings)
                filled += steps
                n = done + steps
            new = self.out[:, :n].to("cpu", copy=True)  # a copy: out is overwritten by the next round
            if self.round_logits is not None:
                self._logits.append(self.round_logits[:n].clone())
            history[:, length : length + n] = new
            length += n
            produced += n
            yield new
            if settings[3] is not None and bool(self.finished.all()):
                return

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        config: GenerationConfig,
        *,
        prompt_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """``idx`` followed by the new tokens (as :meth:`stream`; ``chunk`` None: rounds as long as the
        round buffer, since nothing is streamed); when every row has emitted ``eos_token_id`` the result
        ends at the step where the last row did."""
        pieces = list(
            self.stream(
                idx,
                config,
                prompt_mask=prompt_mask,
                eos_token_id=eos_token_id,
                generator=generator,
                chunk=self.chunk_capacity if chunk is None else chunk,
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


def parameter_fingerprint(model: torch.nn.Module) -> tuple:
    """Where and how the parameters live: an engine built for other addresses must not be reused."""
    return tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())


def cache_length(needed: int, max_seq_len: int) -> int:
    """The cache length an engine gets for ``needed`` positions: a power of two (at least 64),
    so a handful of engines serve every call, capped at ``max_seq_len``."""
    return min(max_seq_len, max(64, 1 << max(needed - 1, 0).bit_length()))
