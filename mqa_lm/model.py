"""A decoder-only transformer built from :class:`MultiQueryAttention`.

Read top to bottom: the config, one pre-norm block, the model (embeddings -> blocks -> final norm ->
tied LM head). ``forward(idx, targets, positions=, cache=)`` serves training, prefill and decoding
alike; generation is a loop over it in :mod:`mqa_lm.inference`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from mqa_lm.nn.attention import KVCache, MultiQueryAttention, check_attention_args
from mqa_lm.nn.cache import DynamicKVCache, StaticKVCache, StaticLayerCache
from mqa_lm.nn.loss import linear_cross_entropy
from mqa_lm.nn.mlp import MLP
from mqa_lm.nn.norms import build_norm, fusable_norm
from mqa_lm.nn.positions import alibi_bias as build_alibi_bias
from mqa_lm.nn.positions import alibi_slopes
from mqa_lm.utils.config import DictRoundTrip, check_int

POSITION_TYPES = ("learned", "rope", "alibi", "none")
MLP_TYPES = ("gelu", "swiglu")
LOSS_IMPLS = ("torch", "chunked")
# How check_attention_args names each attention argument in MQAConfig's errors: the field it comes from.
ATTENTION_FIELD_NAMES = {
    arg: f"model.{field}"
    for arg, field in {
        "dim": "d_model",
        "heads": "heads",
        "kv_heads": "kv_heads",
        "attn_impl": "attn_impl",
        "clip_qkv": "clip_qkv",
        "softmax_scale": "softmax_scale",
        "attn_pdrop": "attn_pdrop",
        "norm_type": "norm_type",
        "fc_type": "fc_type",
        "verbose": "verbose",
        "rope_theta": "rope_theta",
        "norm_eps": "norm_eps",
    }.items()
}


@dataclass
class MQAConfig(DictRoundTrip):
    """Every option of the model, validated on construction (one ValueError naming the field)."""

    config_group: ClassVar[str] = "model config"
    key_prefix: ClassVar[str] = "model."

    vocab_size: int = 50304
    max_seq_len: int = 1024
    n_layers: int = 12
    d_model: int = 768
    heads: int = 12
    kv_heads: int = 1
    attn_impl: str = "auto"
    clip_qkv: float | None = None
    qk_ln: bool = False
    softmax_scale: float | None = None
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    norm_type: str = "low_precision_layernorm"
    norm_eps: float = 1e-5  # every norm of the model (blocks, final, qk_ln)
    fc_type: str = "torch"
    pos_emb: str = "learned"
    rope_theta: float = 10000.0
    mlp_type: str = "gelu"
    mlp_hidden: int | None = None
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    verbose: int = 0
    loss_impl: str = "torch"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "n_layers", "d_model", "heads", "kv_heads"):
            check_int(getattr(self, name), f"model.{name}")
        check_attention_args(
            dim=self.d_model,
            heads=self.heads,
            kv_heads=self.kv_heads,
            attn_impl=self.attn_impl,
            clip_qkv=self.clip_qkv,
            softmax_scale=self.softmax_scale,
            attn_pdrop=self.attn_pdrop,
            norm_type=self.norm_type,
            fc_type=self.fc_type,
            verbose=self.verbose,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            names=ATTENTION_FIELD_NAMES,
        )
        for name in ("resid_pdrop", "emb_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {value}")
        if self.pos_emb not in POSITION_TYPES:
            raise ValueError(f"unknown model.pos_emb {self.pos_emb!r}; valid choices are: {', '.join(POSITION_TYPES)}")
        if self.pos_emb == "rope" and (self.d_model // self.heads) % 2:
            raise ValueError(f"pos_emb='rope' needs an even head_dim, got d_model/heads = {self.d_model // self.heads}")
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"unknown model.mlp_type {self.mlp_type!r}; valid choices are: {', '.join(MLP_TYPES)}")
        check_int(self.mlp_hidden, "model.mlp_hidden", none_ok=True, hint="null is the MLP type's default width")
        if not self.init_std > 0:
            raise ValueError(f"model.init_std must be > 0, got {self.init_std}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"unknown model.loss_impl {self.loss_impl!r}; valid choices are: {', '.join(LOSS_IMPLS)}")

    # How a model runs, is regularised or initialised, not what its trained weights compute: a run
    # continued from a checkpoint (or started from pretrained weights) may change these freely.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"attn_impl", "loss_impl", "attn_pdrop", "resid_pdrop", "emb_pdrop", "verbose", "init_std"}
    )

    def resume_differences(self, saved: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
        """``(field, saved value, this value)`` for every architecture field where ``saved`` (a
        checkpoint's ``hyper_parameters["model"]``) differs from this config; fields absent from
        ``saved`` take their defaults. ``ignore`` skips more fields (``vocab_size`` when it comes
        from the data)."""
        defaults = type(self)(vocab_size=1)
        diffs = []
        for f in fields(self):
            if f.name in self.RUNTIME_FIELDS or f.name in ignore:
                continue
            before = saved.get(f.name, getattr(defaults, f.name))
            if before != getattr(self, f.name):
                diffs.append((f.name, before, getattr(self, f.name)))
        return diffs

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def hidden_size(self) -> int:
        """MLP width: 4·d for GELU; for SwiGLU 8/3·d rounded up to a multiple of 64 (same FLOPs)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp_type == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model


def fused_decode_step(module: nn.Module, x: torch.Tensor, cache: StaticKVCache) -> bool:
    """Whether a one-token step of ``x`` [batch, 1, ...] into ``cache`` may run on the fused decode
    kernels (:mod:`mqa_lm.kernels.triton.decode_linear`): the cache asks for them (CUDA, or the Triton
    interpreter), a few rows, inference (no grad, no dropout, no autocast), and not under
    ``torch.compile`` (Inductor fuses the same ops itself)."""
    if not cache.fused_layers or module.training or torch.is_grad_enabled():
        return False  # before the import below: elsewhere (CPU) the process never imports Triton
    from mqa_lm.kernels.triton.decode_linear import MAX_ROWS

    if x.shape[0] > MAX_ROWS:
        return False
    return not (torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling())


def _weight_and_bias(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return cast(torch.Tensor, linear.weight), cast("torch.Tensor | None", linear.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    # Declared so that code reaching a block through ``MQATransformer.blocks`` (an nn.ModuleList,
    # which a type checker sees as holding plain Modules) gets the submodules' real types.
    norm_1: nn.Module
    attn: MultiQueryAttention
    norm_2: nn.Module
    mlp: MLP
    resid_dropout: nn.Dropout

    def __init__(self, config: MQAConfig) -> None:
        super().__init__()
        self.norm_1 = build_norm(config.norm_type, config.d_model, eps=config.norm_eps)
        # MQAConfig checked these arguments once for every layer.
        self.attn = MultiQueryAttention.prechecked(
            dim=config.d_model,
            heads=config.heads,
            kv_heads=config.kv_heads,
            attn_impl=config.attn_impl,
            clip_qkv=config.clip_qkv,
            qk_ln=config.qk_ln,
            softmax_scale=config.softmax_scale,
            attn_pdrop=config.attn_pdrop,
            norm_type=config.norm_type,
            fc_type=config.fc_type,
            verbose=config.verbose,
            bias=config.bias,
            device=None,
            rope_theta=config.rope_theta if config.pos_emb == "rope" else None,
            norm_eps=config.norm_eps,
            rope_max_positions=config.max_seq_len,
        )
        self.norm_2 = build_norm(config.norm_type, config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config.d_model, config.hidden_size, config.mlp_type, config.fc_type, config.bias)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self._fusable: bool | None = None  # see fused_decode_ok

    def forward(
        self,
        x: torch.Tensor,
        past_key_value: KVCache | None = None,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        needs_weights: bool = False,
        *,
        positions: torch.Tensor | None = None,
        cache: StaticLayerCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KVCache]:
        if cache is not None and x.shape[1] == 1 and not needs_weights and self.fused_decode_ok(x, cache):
            return self._decode_fused(x, bias, positions, cache), None, (cache.keys, cache.values)
        attn_out, weights, present = self.attn(
            self.norm_1(x),
            past_key_value=past_key_value,
            bias=bias,
            mask=mask,
            needs_weights=needs_weights,
            positions=positions,
            cache=cache,
        )
        return self._residual_and_mlp(x, attn_out), weights, present

    def probe(
        self, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` on the reference attention path, returning ``(x, attn_weights, max_logit)``
        (see :meth:`MultiQueryAttention.probe`). Runs the block's own modules directly, so it needs
        the block's parameters whole: not for a block sharded by FSDP."""
        attn_out, weights, max_logit, _ = self.attn.probe(self.norm_1(x), bias=bias)
        return self._residual_and_mlp(x, attn_out), weights, max_logit

    def _residual_and_mlp(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(attn_out)
        return x + self.resid_dropout(self.mlp(self.norm_2(x)))

    # ---- the decode step as four fused linear kernels -----------------------------------------

    def fused_decode_ok(self, x: torch.Tensor, cache: StaticLayerCache) -> bool:
        """Whether this one-token step into ``cache`` runs as :meth:`_decode_fused`: the step may
        (:func:`fused_decode_step`) and the block's layers are ones the kernels compute
        (``fc_type='torch'``, a LayerNorm or RMSNorm)."""
        if not fused_decode_step(self, x, cache.owner):
            return False
        if self._fusable is None:
            linears = (self.attn.Wqkv, self.attn.out_proj, self.mlp.up_proj, self.mlp.down_proj)
            self._fusable = (
                all(type(layer) is nn.Linear for layer in linears)
                and fusable_norm(self.norm_1) is not None
                and fusable_norm(self.norm_2) is not None
            )
        return self._fusable and x.dtype == self.attn.Wqkv.weight.dtype

    def _decode_fused(
        self, x: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor | None, cache: StaticLayerCache
    ) -> torch.Tensor:
        written = self.attn.kv_as_projected

        def attend(qkv: torch.Tensor) -> torch.Tensor:
            return self.attn.decode_context(x, qkv, bias, positions, cache, kv_written=written)[0]

        return self.fused_layers(x, attend, (cache.kv, cache.owner.slot) if written else None)

    def fused_layers(
        self,
        x: torch.Tensor,
        attend: Callable[[torch.Tensor], torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        linear: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The block on ``x`` [batch, 1, d_model] as four fused kernels around ``attend`` (the QKV
        projection -> the context before ``out_proj``): norm + QKV (also writing the keys and values
        into ``kv`` = (a layer's packed cache, the slot) where given), out_proj + residual, norm + up +
        activation, down + residual. Eval mode: no dropout. ``linear`` stands in for
        :func:`~mqa_lm.kernels.triton.decode_linear.fused_linear` (to list the launches a step makes)."""
        if linear is None:
            from mqa_lm.kernels.triton.decode_linear import fused_linear

            linear = fused_linear
        attn, mlp = self.attn, self.mlp
        norm_1, norm_2 = fusable_norm(self.norm_1), fusable_norm(self.norm_2)
        assert norm_1 is not None and norm_2 is not None  # fused_decode_ok checked them
        kv_cache, slot = kv if kv is not None else (None, None)
        qkv = linear(x, *_weight_and_bias(attn.Wqkv), **norm_1, kv_cache=kv_cache, slot=slot)
        h = linear(attend(qkv), *_weight_and_bias(attn.out_proj), residual=x)
        activation = "swiglu" if mlp.mlp_type == "swiglu" else "gelu_tanh"
        up = linear(h, *_weight_and_bias(mlp.up_proj), activation=activation, **norm_2)
        return linear(up, *_weight_and_bias(mlp.down_proj), residual=h)


class MQATransformer(nn.Module):
    """Decoder-only language model. ``forward(idx, targets)`` -> ``(logits, loss)``."""

    def __init__(self, config: MQAConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model) if config.pos_emb == "learned" else None
        self.emb_dropout = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = build_norm(config.norm_type, config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # ALiBi tables per device, kept in fp32 on purpose: not a buffer, because model.to(bf16)
        # would round -slope * distance to whole units for distant keys.
        self._alibi_tables: dict[torch.device, torch.Tensor] = {}
        self._alibi_slope_tables: dict[torch.device, torch.Tensor] = {}
        self.reset_parameters()

    # ---- initialisation ---------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, unit norms, and the projections that write
        into the residual stream (attention out_proj, MLP down_proj) scaled by 1/sqrt(2·n_layers)."""
        std = self.config.init_std
        for module in self.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(weight, nn.Parameter) and weight.dim() == 1:
                nn.init.ones_(weight)
            else:
                continue
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in cast(list[Block], self.blocks):
            for projection in (block.attn.out_proj, block.mlp.down_proj):  # nn.Linear or TE's Linear
                nn.init.normal_(cast(torch.Tensor, projection.weight), mean=0.0, std=residual_std)

    # ---- forward ----------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: DynamicKVCache | StaticKVCache | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``idx`` [batch, seq] token ids -> ``(logits [batch, seq, vocab], loss or None)``.

        Args:
            targets: [batch, seq]: also return the mean cross-entropy; positions set to -100 are
                ignored. With ``loss_impl='chunked'`` the loss comes from
                :func:`mqa_lm.nn.loss.linear_cross_entropy`, which never forms the whole logits, so a
                call with targets returns ``(None, loss)``.
            positions: int [batch, seq], each token's position (learned embeddings, RoPE); default
                ``cache length + 0..seq-1`` for every row. A left-padded batch passes each row's own,
                counted from its first real token. Must be below ``max_seq_len``.
            cache: a :class:`~mqa_lm.nn.cache.DynamicKVCache` (the tokens follow the cached ones, and
                it grows) or a :class:`~mqa_lm.nn.cache.StaticKVCache` from :meth:`static_cache`
                (a prefill into an empty cache, then one token per call); see :mod:`mqa_lm.nn.cache`.
            logits_to_keep: only the logits of the last ``n`` positions (0: all), as a prefill needs.
        """
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {list(targets.shape)} must equal idx shape {list(idx.shape)}")
        if targets is None and isinstance(cache, StaticKVCache) and idx.shape[1] == 1:
            head = self._fused_head()
            if head is not None and fused_decode_step(self, idx, cache):
                # The final norm in the LM head's kernel: one launch instead of two.
                from mqa_lm.kernels.triton.decode_linear import fused_linear

                return fused_linear(self._hidden(idx, positions, cache, final_norm=False), **head), None
        hidden = self._hidden(idx, positions, cache)
        if targets is None:
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            return self.lm_head(hidden), None
        if self.config.loss_impl == "chunked":
            loss = linear_cross_entropy(
                hidden.reshape(-1, hidden.size(-1)),
                self.lm_head.weight,
                targets.reshape(-1),
                chunk_size=self.loss_chunk_rows(),
                ignore_index=-100,
            )
            return None, loss
        logits = self.lm_head(hidden)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def fused_decode_launches(self, cache: StaticKVCache) -> list[Callable[[], torch.Tensor]]:
        """One call per fused kernel a decode step into ``cache`` launches (a block's four, the LM
        head's), each on zeros of the step's shapes and a scratch cache, so they write nothing to
        ``cache`` and depend on nothing but the weights: the engine's background warm-up runs them,
        side by side (a Triton kernel's first launch in a process compiles or loads it). Empty
        where the step is not fused."""
        from mqa_lm.kernels.triton.decode_linear import fused_linear, output_features

        calls: list[Callable[[], torch.Tensor]] = []

        def listed(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs: Any):
            calls.append(functools.partial(fused_linear, inp, weight, bias, **kwargs))
            features = output_features(weight, kwargs.get("activation", "none"))
            return inp.new_zeros(*inp.shape[:-1], features)

        block = cast(Block, self.blocks[0])
        x = torch.zeros(cache.batch_size, 1, self.config.d_model, device=cache.device, dtype=cache.dtype)
        if block.fused_decode_ok(x, cache.layers[0]):
            kv = (torch.zeros_like(cache.layers[0].kv), torch.zeros_like(cache.slot))
            context = x.new_zeros(*x.shape[:-1], cast(torch.Tensor, block.attn.out_proj.weight).shape[1])
            block.fused_layers(x, lambda qkv: context, kv if block.attn.kv_as_projected else None, linear=listed)
        head = self._fused_head()
        if head is not None and fused_decode_step(self, x, cache):
            calls.append(functools.partial(fused_linear, x, **head))
        return calls

    def _fused_head(self) -> dict | None:
        """The fused LM head's arguments (its weight and the final norm's), or None where the head or
        the final norm is not one the kernel computes."""
        norm = fusable_norm(self.norm_f)
        if norm is None or type(self.lm_head) is not nn.Linear or self.lm_head.bias is not None:
            return None
        return {"weight": self.lm_head.weight, **norm}

    def loss_chunk_rows(self) -> int:
        """Rows per chunk of the chunked loss: about 2**26 logits (256 MiB in fp32) per chunk, large
        enough to keep the head's matmuls efficient, small next to the logits of a whole batch."""
        return max(1, 2**26 // self.config.vocab_size)

    def static_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        decode_attention: str = "auto",
        split_size: int | None = None,
    ) -> StaticKVCache:
        """A :class:`~mqa_lm.nn.cache.StaticKVCache` for this model on its device: ``max_len`` slots
        (default and at most ``max_seq_len``), in ``dtype`` (default: the autocast dtype when autocast
        is on, else the weights')."""
        config = self.config
        max_len = config.max_seq_len if max_len is None else max_len
        check_int(
            max_len,
            "max_len",
            maximum=config.max_seq_len,
            hint=f"the model has positions for max_seq_len={config.max_seq_len} tokens",
        )
        device = self.wte.weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.wte.weight.dtype
        return StaticKVCache(
            config.n_layers,
            batch_size,
            config.kv_heads,
            config.head_dim,
            max_len,
            device=device,
            dtype=dtype,
            decode_attention=decode_attention,
            split_size=split_size,
        )

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden states [batch, seq, d_model] of ``idx``: ``lm_head`` of them is the
        logits. For callers that need the logits of a few positions only (scoring continuations),
        which then skip the head's matmul and the [batch, seq, vocab] tensor for the rest."""
        return self._hidden(idx)

    @torch.no_grad()
    def attention_probe(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Diagnostics of one forward on the reference path: per layer, the post-softmax weights
        [batch, heads, seq, seq] and the largest pre-softmax logit ``scale * q.k`` [batch, heads]
        over the keys each query may see (see :func:`mqa_lm.nn.attention.max_attention_logit`)."""
        x = self.embed(idx)
        bias = self.alibi_bias(idx.device)
        weights, max_logits = [], []
        for block in self.blocks:
            x, w, m = cast(Block, block).probe(x, bias=bias)
            weights.append(w)
            max_logits.append(m)
        return weights, max_logits

    def check_token_ids(self, idx: torch.Tensor) -> None:
        """Raise ValueError, naming the vocabulary size, unless every id is in ``[0, vocab_size)``.

        Reads ``idx``'s extremes on the host: one device sync for a tensor on an accelerator.
        """
        if idx.numel() == 0:
            return
        lo, hi = (int(v) for v in idx.aminmax())
        vocab = self.config.vocab_size
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"token ids must be in [0, {vocab}) for this model (model.vocab_size={vocab}), "
                f"got ids from {lo} to {hi}; "
                "encode with the tokenizer the model was trained with, or build the model with a vocab_size of at "
                "least the tokenizer's"
            )

    def embed(self, idx: torch.Tensor, past_len: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The first block's input for ``idx`` [batch, seq] placed after ``past_len`` cached tokens
        (or at ``positions`` [batch, seq]): token (+ learned position) embeddings after dropout."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"idx must be integer token ids [batch, seq], got {idx.dtype} {list(idx.shape)}")
        seq = idx.shape[1]
        total = past_len + seq
        if total > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {total} tokens (cached {past_len} + new {seq}) exceeds "
                f"max_seq_len={self.config.max_seq_len}; crop the input or raise model.max_seq_len"
            )
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            # Free of host syncs on the CPU; on an accelerator the check would stall every step, so
            # there an id out of range is the device's own indexing error (generate checks its prompt).
            # Not traced: reading the ids would be a data-dependent branch for torch.compile/export.
            self.check_token_ids(idx)
        x = self.wte(idx.long())
        if self.wpe is not None:
            x = x + self.wpe(positions if positions is not None else torch.arange(past_len, total, device=idx.device))
        return self.emb_dropout(x)

    def _hidden(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: DynamicKVCache | StaticKVCache | None = None,
        final_norm: bool = True,
    ) -> torch.Tensor:
        """The final-norm hidden states [batch, seq, d_model] (before that norm with
        ``final_norm=False``); ``cache`` is read and updated."""
        seq = idx.shape[1]
        static = cache if isinstance(cache, StaticKVCache) else None
        dynamic = cache if isinstance(cache, DynamicKVCache) else None
        if cache is not None and static is None and dynamic is None:
            raise TypeError(f"cache must be a DynamicKVCache or a StaticKVCache, got {type(cache).__name__}")
        if positions is not None and tuple(positions.shape) != tuple(idx.shape):
            raise ValueError(f"positions must have the shape of idx {list(idx.shape)}, got {list(positions.shape)}")
        if static is not None:
            if static.batch_size != idx.shape[0]:
                raise ValueError(f"the static cache holds {static.batch_size} rows, idx has {idx.shape[0]}")
            static.begin(seq)
            if positions is None and seq == 1:  # no padding: a row's position is its slot
                positions = static.slot.expand(idx.shape[0])[:, None]
        if dynamic is not None and dynamic.layers and len(dynamic.layers) != len(self.blocks):
            raise ValueError(f"the cache has {len(dynamic.layers)} layers, the model {len(self.blocks)}")
        past_len = dynamic.length if dynamic is not None else 0
        x = self.embed(idx, past_len, positions)
        bias = self.alibi_bias(idx.device)
        if bias is not None and static is not None:
            # Built by the prefill already: a compiled decode step that found them missing would be
            # compiled again on its second call.
            slopes = self._alibi_slopes(idx.device)
            if seq == 1:
                bias = static.decode_bias(slopes)
        for i, block in enumerate(self.blocks):
            x, _, present = block(
                x,
                past_key_value=dynamic.layer(i) if dynamic is not None else None,
                bias=bias,
                positions=positions,
                cache=static.layers[i] if static is not None else None,
            )
            if dynamic is not None:
                dynamic.update(i, present)
        if static is not None:
            static.end(seq)
        return self.norm_f(x) if final_norm else x

    def alibi_bias(self, device: torch.device) -> torch.Tensor | None:
        """The fp32 ALiBi bias [1, heads, 1, max_seq_len] (None unless ``pos_emb='alibi'``).

        Passed whole: the block crops it to the last ``k_len`` columns, so the newest key's bias is
        0 and the rest are -slope * distance. (A crop from the left would offset every score by
        slope * (max_seq_len - k_len) and spend fp32/bf16 precision on that offset.)
        """
        if self.config.pos_emb != "alibi":
            return None
        table = self._alibi_tables.get(device)
        if table is None:
            table = build_alibi_bias(self.config.heads, self.config.max_seq_len, device)
            self._alibi_tables[device] = table
        return table

    def _alibi_slopes(self, device: torch.device) -> torch.Tensor:
        """Per-head ALiBi slopes in fp32 on ``device`` (the static-cache decode bias is built from them)."""
        slopes = self._alibi_slope_tables.get(device)
        if slopes is None:
            slopes = self._alibi_slope_tables[device] = alibi_slopes(self.config.heads).to(device)
        return slopes

    # ---- accounting ---------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). ``non_embedding`` drops the position table and, when
        the head is untied, the input embedding: the parameters that cost no matmul FLOPs."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.wte.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM-style (Chowdhery et al. 2022, appendix B):
        ``6·N + 12·L·H·Q·T`` with N the non-embedding parameters (the tied LM head counts, since it
        is a matmul), L layers, H query heads, Q head_dim and T the sequence length. MQA does not
        shrink the attention term: every query head still scores every key. Forward is a third of it.
        """
        t = self.config.max_seq_len if seq_len is None else seq_len
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layers * c.heads * c.head_dim * t
