"""Hugging Face transformers interop: export to, and import from, two stock architectures.

* **GPTBigCode** (``model_type: gpt_bigcode``, e.g. SantaCoder/StarCoder): learned positions, GELU
  (tanh) MLP, LayerNorm, and either MQA (``multi_query=True``, our ``kv_heads=1``) or MHA
  (``kv_heads=heads``). transformers' GPTBigCode has no grouped-query mode, so GQA is refused for it.
* **Llama** (``model_type: llama``): RoPE (rotate-half over the whole head), SwiGLU, RMSNorm, any
  ``kv_heads``; ``attention_bias``/``mlp_bias`` carry our ``bias``.

The exported directory loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` and no custom code. A model that neither class computes exactly
is refused with one error listing every option in the way.

Exact without a flag of its own: ``bias=False`` in GPTBigCode (its biases are stored as zeros),
``pos_emb='none'`` in GPTBigCode (a zero position table), ``low_precision_*`` norms (identical to the
full-precision norm without autocast; under autocast transformers normalises in fp32, the more
precise of the two), dropout rates (training only; Llama has no residual/embedding dropout).
The norm epsilon travels both ways: ``MQAConfig.norm_eps`` is GPTBigCode's ``layer_norm_epsilon``
and Llama's ``rms_norm_eps`` (a config.json without one gets transformers' default, 1e-5 and 1e-6).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from tokenizers import Tokenizer

from mqa_lm.data.tokenizer import EOT, UNK
from mqa_lm.model import MQAConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

    from mqa_lm.model import MQATransformer

FAMILIES = ("gpt_bigcode", "llama")
# transformers' defaults where a config.json leaves the epsilon out (GPTBigCodeConfig, LlamaConfig).
HF_DEFAULT_EPS = {"gpt_bigcode": 1e-5, "llama": 1e-6}


SHARD_INDEX = "model.safetensors.index.json"


class HFExportError(ValueError):
    """The model has options no supported transformers class computes; the message lists them all."""


class HFImportError(ValueError):
    """A transformers checkpoint mqa-lm cannot represent exactly; the message names what and why."""


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"Hugging Face interop needs transformers ({err}); install it with pip install 'mqa-lm[hf]'"
        ) from err
    return transformers


# ---- which class, and what is in the way ------------------------------------------------------


def default_family(config: MQAConfig) -> str | None:
    """The transformers family whose positions match ``config`` (None for ALiBi)."""
    if config.pos_emb in ("learned", "none"):
        return "gpt_bigcode"
    if config.pos_emb == "rope":
        return "llama"
    return None


def _default_scale(config: MQAConfig) -> bool:
    want = config.head_dim**-0.5
    return config.softmax_scale is None or math.isclose(config.softmax_scale, want, rel_tol=1e-12)


def export_blockers(config: MQAConfig, family: str | None = None) -> list[str]:
    """Every option of ``config`` that ``family`` (default: by positions) cannot compute, each as
    ``"model.<field>=<value>: <why>"``; empty when the export is exact."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid choices are: {', '.join(FAMILIES)}")
    family = family or default_family(config)
    blockers = []
    if config.pos_emb == "alibi":
        blockers.append("model.pos_emb='alibi': neither GPTBigCode nor Llama has ALiBi")
    if config.qk_ln:
        blockers.append("model.qk_ln=true: neither GPTBigCode nor Llama normalises queries and keys")
    if config.clip_qkv is not None:
        blockers.append(f"model.clip_qkv={config.clip_qkv}: neither GPTBigCode nor Llama clips q, k, v")
    if not _default_scale(config):
        blockers.append(
            f"model.softmax_scale={config.softmax_scale}: GPTBigCode and Llama scale by 1/sqrt(head_dim) = "
            f"{config.head_dim**-0.5:.6g}"
        )
    if family == "gpt_bigcode":
        if config.pos_emb == "rope":
            blockers.append("model.pos_emb='rope': GPTBigCode has learned positions (export RoPE models as llama)")
        if config.kv_heads not in (1, config.heads):
            blockers.append(
                f"model.kv_heads={config.kv_heads}: GPTBigCode has MQA (kv_heads=1) or MHA (kv_heads=heads="
                f"{config.heads}), no grouped-query attention"
            )
        if config.mlp_type != "gelu":
            blockers.append(f"model.mlp_type={config.mlp_type!r}: GPTBigCode's MLP is GELU")
        if "layernorm" not in config.norm_type:
            blockers.append(f"model.norm_type={config.norm_type!r}: GPTBigCode uses LayerNorm")
    elif family == "llama":
        if config.pos_emb != "rope":
            blockers.append(f"model.pos_emb={config.pos_emb!r}: Llama uses RoPE")
        if config.mlp_type != "swiglu":
            blockers.append(f"model.mlp_type={config.mlp_type!r}: Llama's MLP is SwiGLU")
        if "rmsnorm" not in config.norm_type:
            blockers.append(f"model.norm_type={config.norm_type!r}: Llama uses RMSNorm")
    return blockers


def check_exportable(config: MQAConfig, family: str | None = None) -> str:
    """The family to export ``config`` as; :class:`HFExportError` listing every blocker otherwise."""
    blockers = export_blockers(config, family)
    chosen = family or default_family(config)
    if blockers or chosen is None:
        target = chosen or "any supported transformers class (gpt_bigcode, llama)"
        raise HFExportError(
            f"cannot export this model as {target} without changing what it computes: "
            + "; ".join(blockers)
            + ". Train with options the class has (see mqa_lm.pretrained.hf), or keep the mqa-lm format "
            "(save_pretrained)"
        )
    return chosen


# ---- ours -> transformers ---------------------------------------------------------------------


def _special_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    eot = tokenizer.token_to_id(EOT) if tokenizer is not None else None
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None}


def to_hf_config(config: MQAConfig, family: str, tokenizer: Tokenizer | None = None) -> PretrainedConfig:
    """The transformers config of ``family`` that computes ``config``'s model."""
    transformers = _require_transformers()
    common = {
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        **_special_ids(tokenizer),
    }
    if family == "gpt_bigcode":
        return transformers.GPTBigCodeConfig(
            n_positions=config.max_seq_len,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.heads,
            n_inner=config.hidden_size,
            activation_function="gelu_pytorch_tanh",
            resid_pdrop=config.resid_pdrop,
            embd_pdrop=config.emb_pdrop,
            attn_pdrop=config.attn_pdrop,
            layer_norm_epsilon=config.norm_eps,
            scale_attn_weights=True,
            multi_query=config.kv_heads == 1,
            **common,
        )
    return transformers.LlamaConfig(
        hidden_size=config.d_model,
        intermediate_size=config.hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=config.attn_pdrop,
        **common,
    )


def _interleave_mha(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[q; k; v] rows (ours) -> per-head [q_h; k_h; v_h] rows (GPTBigCode's MHA c_attn)."""
    q, k, v = t.chunk(3, dim=0)
    per_head = [x.reshape(heads, -1, *x.shape[1:]) for x in (q, k, v)]
    return torch.stack(per_head, dim=1).reshape(t.shape)


def _deinterleave_mha(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`_interleave_mha`."""
    grouped = t.reshape(heads, 3, -1, *t.shape[1:])
    return torch.cat([grouped[:, i].reshape(-1, *t.shape[1:]) for i in range(3)], dim=0)


# One table per family, read by export and import alike: our module -> its transformers module(s)
# within a block. Several modules stand for one of ours that stores them fused, in our row order.
_BLOCK_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt_bigcode": {
        "norm_1": ("ln_1",),
        "norm_2": ("ln_2",),
        "attn.Wqkv": ("attn.c_attn",),
        "attn.out_proj": ("attn.c_proj",),
        "mlp.up_proj": ("mlp.c_fc",),
        "mlp.down_proj": ("mlp.c_proj",),
    },
    "llama": {
        "norm_1": ("input_layernorm",),
        "norm_2": ("post_attention_layernorm",),
        "attn.Wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn.out_proj": ("self_attn.o_proj",),
        "mlp.up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj": ("mlp.down_proj",),
    },
}
_BLOCK_PREFIX = {"gpt_bigcode": "transformer.h", "llama": "model.layers"}
_TOP_MODULES: dict[str, dict[str, str]] = {
    "gpt_bigcode": {"wte": "transformer.wte", "wpe": "transformer.wpe", "norm_f": "transformer.ln_f"},
    "llama": {"wte": "model.embed_tokens", "norm_f": "model.norm"},
}


class _Mapped(NamedTuple):
    ours: str  # our module, e.g. "blocks.0.attn.Wqkv"
    theirs: tuple[str, ...]  # its transformers module(s)
    rows: tuple[int, ...]  # rows of each of ``theirs`` within ours (when there are several)
    params: tuple[str, ...]  # the tensors the transformers side stores: "weight", maybe "bias"
    interleave: bool  # GPTBigCode's MHA c_attn orders rows per head as [q_h; k_h; v_h]


def _weight_map(config: MQAConfig, family: str) -> list[_Mapped]:
    """Every module both formats store for ``config`` as ``family``, from the tables above."""
    gpt = family == "gpt_bigcode"
    dim, kv_dim, hidden = config.d_model, config.kv_heads * config.head_dim, config.hidden_size
    rows = {"attn.Wqkv": (dim, kv_dim, kv_dim), "mlp.up_proj": (hidden, hidden)}
    # GPTBigCode stores every bias (zeros for our bias=False); Llama's RMSNorm has none.
    top = [
        _Mapped(ours, (theirs,), (), ("weight", "bias") if gpt and ours == "norm_f" else ("weight",), False)
        for ours, theirs in _TOP_MODULES[family].items()
    ]
    blocks = [
        _Mapped(
            f"blocks.{i}.{ours}",
            tuple(f"{_BLOCK_PREFIX[family]}.{i}.{t}" for t in theirs),
            rows[ours] if len(theirs) > 1 else (),
            ("weight", "bias") if gpt or (config.bias and not ours.startswith("norm")) else ("weight",),
            gpt and ours == "attn.Wqkv" and config.kv_heads != 1,
        )
        for i in range(config.n_layers)
        for ours, theirs in _BLOCK_MODULES[family].items()
    ]
    return top + blocks


def to_hf_state_dict(config: MQAConfig, state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Our ``MQATransformer`` state dict as the transformers ``*ForCausalLM`` state dict of ``family``."""
    out: dict[str, torch.Tensor] = {}
    dtype = state["wte.weight"].dtype
    for m in _weight_map(config, family):
        for param in m.params:
            key = f"{m.ours}.{param}"
            # GPTBigCode stores what we may lack (bias=False, pos_emb='none') as zeros.
            if key not in state and param == "bias":
                tensor = torch.zeros(state[f"{m.ours}.weight"].shape[0], dtype=dtype)
            elif key not in state and m.ours == "wpe":
                tensor = torch.zeros(config.max_seq_len, config.d_model, dtype=dtype)
            else:
                tensor = state[key]
            if m.interleave:
                tensor = _interleave_mha(tensor, config.heads)
            parts = tensor.split(m.rows, dim=0) if m.rows else (tensor,)
            for name, part in zip(m.theirs, parts, strict=True):
                out[f"{name}.{param}"] = part
    out["lm_head.weight"] = state.get("lm_head.weight", state["wte.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_model(
    model: MQATransformer, family: str | None = None, tokenizer: Tokenizer | None = None
) -> PreTrainedModel:
    """A transformers ``*ForCausalLM`` holding ``model``'s weights (refused as :func:`check_exportable`
    says); ``tokenizer`` gives the bos/eos ids."""
    transformers = _require_transformers()
    family = check_exportable(model.config, family)
    hf_config = to_hf_config(model.config, family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_state = to_hf_state_dict(model.config, state, family)
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    # Non-persistent buffers (GPTBigCode's causal mask, rotary inv_freq) are not in a state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"internal: {family} weight mapping is off (missing {missing}, unexpected {unexpected})")
    return hf_model.to(next(model.parameters()).dtype).eval()


def to_hf_tokenizer(tokenizer: Tokenizer, max_seq_len: int) -> PreTrainedTokenizerFast:
    """``tokenizer`` as a ``PreTrainedTokenizerFast`` (what ``AutoTokenizer`` loads back)."""
    transformers = _require_transformers()
    special: dict[str, str] = {}
    if tokenizer.token_to_id(EOT) is not None:
        special.update(bos_token=EOT, eos_token=EOT)
    if tokenizer.token_to_id(UNK) is not None:
        special["unk_token"] = UNK
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_seq_len, **special)


def export_hf(
    model: MQATransformer,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a transformers directory; returns it.

    The directory is assembled under a temp name beside ``directory`` and renamed into place, so it
    is either absent or complete. An existing non-empty ``directory`` is refused unless ``overwrite``.
    """
    directory = Path(directory).expanduser()
    family = check_exportable(model.config, family)  # before touching the file system
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; choose a new directory or pass --overwrite")
    hf_model = to_hf_model(model, family, tokenizer)
    if dtype is not None:
        # transformers decorates PreTrainedModel.to with functools.wraps, whose typeshed type loses ``self``.
        hf_model = hf_model.to(dtype)  # type: ignore[arg-type]
    staging = directory.parent / f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        hf_model.save_pretrained(staging)
        if tokenizer is not None:
            to_hf_tokenizer(tokenizer, model.config.max_seq_len).save_pretrained(staging)
        if directory.exists():
            old = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.old"
            directory.rename(old)
            staging.rename(directory)
            shutil.rmtree(old)
        else:
            staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


# ---- transformers -> ours ---------------------------------------------------------------------


def _hf_get(hf: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> MQAConfig:
    """Our config for a GPTBigCode or Llama ``config.json`` dict; :class:`HFImportError` listing every
    setting mqa-lm cannot compute exactly."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise HFImportError(
            f"{where}: model_type={model_type!r} is not supported; mqa-lm imports {', '.join(FAMILIES)} checkpoints"
        )
    problems = []

    def need(name: str, ok: bool, why: str) -> None:
        if not ok:
            problems.append(f"{name}={hf.get(name)!r}: {why}")

    if model_type == "gpt_bigcode":
        d_model, heads = hf["n_embd"], hf["n_head"]
        need(
            "activation_function",
            hf.get("activation_function", "gelu_pytorch_tanh") in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"),
            "mqa-lm's MLP uses the tanh GELU",
        )
        need("scale_attn_weights", hf.get("scale_attn_weights", True), "mqa-lm always scales by 1/sqrt(head_dim)")
        need("add_cross_attention", not hf.get("add_cross_attention", False), "mqa-lm is decoder-only")
        fields = dict(
            vocab_size=hf["vocab_size"],
            max_seq_len=hf["n_positions"],
            n_layers=hf["n_layer"],
            d_model=d_model,
            heads=heads,
            kv_heads=1 if hf.get("multi_query", True) else heads,
            norm_type="layernorm",
            norm_eps=_hf_get(hf, "layer_norm_epsilon", default=HF_DEFAULT_EPS["gpt_bigcode"]),
            pos_emb="learned",
            mlp_type="gelu",
            mlp_hidden=hf.get("n_inner") or 4 * d_model,
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            resid_pdrop=hf.get("resid_pdrop", 0.0),
            emb_pdrop=hf.get("embd_pdrop", 0.0),
            attn_pdrop=hf.get("attn_pdrop", 0.0),
            init_std=hf.get("initializer_range", 0.02),
        )
    else:
        d_model, heads = hf["hidden_size"], hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = _hf_get(rope, "rope_theta", default=hf.get("rope_theta", 10000.0))
        need("hidden_act", hf.get("hidden_act", "silu") == "silu", "mqa-lm's SwiGLU gates with SiLU")
        head_dim = hf.get("head_dim") or d_model // heads
        need("head_dim", head_dim * heads == d_model, f"mqa-lm needs head_dim * heads = hidden_size ({d_model})")
        need(
            "attention_bias",
            bool(hf.get("attention_bias", False)) == bool(hf.get("mlp_bias", False)),
            f"mqa-lm has one bias switch for all projections, but mlp_bias={hf.get('mlp_bias')!r}",
        )
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        if rope_type != "default":
            problems.append(f"rope_parameters.rope_type={rope_type!r}: mqa-lm has plain RoPE only")
        if hf.get("pretraining_tp", 1) not in (None, 1):
            problems.append(f"pretraining_tp={hf.get('pretraining_tp')!r}: only 1 is supported")
        fields = dict(
            vocab_size=hf["vocab_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            n_layers=hf["num_hidden_layers"],
            d_model=d_model,
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            norm_type="rmsnorm",
            norm_eps=_hf_get(hf, "rms_norm_eps", default=HF_DEFAULT_EPS["llama"]),
            pos_emb="rope",
            rope_theta=float(theta),
            mlp_type="swiglu",
            mlp_hidden=hf["intermediate_size"],
            bias=bool(hf.get("attention_bias", False)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attn_pdrop=hf.get("attention_dropout", 0.0) or 0.0,
            init_std=hf.get("initializer_range", 0.02),
        )
    if problems:
        raise HFImportError(
            f"{where} ({model_type}) has settings mqa-lm cannot compute exactly: " + "; ".join(problems)
        )
    try:
        config = MQAConfig(attn_impl="torch", **fields)
        # The default width is kept as null, so an exported-then-imported config compares equal.
        default = replace(config, mlp_hidden=None)
        return default if default.hidden_size == config.hidden_size else config
    except (ValueError, TypeError) as err:
        raise HFImportError(f"{where} ({model_type}) does not map to a valid mqa-lm model: {err}") from None


def from_hf_state_dict(config: MQAConfig, hf_state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict` (a ``*ForCausalLM`` or bare-model state dict)."""
    base = "transformer." if family == "gpt_bigcode" else "model."
    # A bare GPTBigCodeModel / LlamaModel saves its keys without the base prefix.
    if not any(k.startswith(base) for k in hf_state):
        hf_state = {base + k: v for k, v in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    weight_map = _weight_map(config, family)
    for m in weight_map:
        for param in m.params:
            parts = [hf_state[f"{name}.{param}"] for name in m.theirs]
            tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            out[f"{m.ours}.{param}"] = _deinterleave_mha(tensor, config.heads) if m.interleave else tensor
    if not config.tie_embeddings:
        out["lm_head.weight"] = hf_state["lm_head.weight"]
    # Every tensor of the checkpoint must have been used: mapping back must give exactly its keys.
    expected = {f"{name}.{param}" for m in weight_map for name in m.theirs for param in m.params}
    unused = sorted(set(hf_state) - expected - {"lm_head.weight"})
    if unused:
        raise HFImportError(
            f"the checkpoint has weights mqa-lm's {family} mapping does not use: {', '.join(unused[:6])}"
            + (f" ... ({len(unused)} in all)" if len(unused) > 6 else "")
        )
    return out


def _shard_files(index: Path) -> list[str]:
    """The weight files a ``model.safetensors.index.json`` names (its ``weight_map`` values)."""
    import json

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise HFImportError(
            f"{index} is not a valid shard index ({type(err).__name__}: {err}); it must be a JSON object whose "
            "weight_map maps each weight to its file; save the model again"
        ) from None
    # A name that leaves the directory is not a shard of this model.
    bad = [name for name in files if not isinstance(name, str) or Path(name).name != name]
    if bad or not files:
        raise HFImportError(
            f"{index} lists no shard files, or names outside its directory ({bad[:3]}); save the model again"
        )
    return files


def hf_weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a transformers directory: ``model.safetensors``, or every shard its
    ``model.safetensors.index.json`` lists. Checks they exist (cheap, before any weight is read):
    a missing shard is an :class:`HFImportError` naming it and the fix."""
    directory = Path(directory).expanduser()
    index = directory / SHARD_INDEX
    if index.is_file():
        files = _shard_files(index)
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            shown = ", ".join(str(directory / name) for name in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise HFImportError(
                f"{shown} is missing: {len(missing)} of the {len(files)} shard files listed in {SHARD_INDEX} "
                f"are not in {directory}; copy every shard the index lists into it (an interrupted download or "
                "copy?), or save the model again"
            )
        return [directory / name for name in files]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise HFImportError(
        f"{directory} has no model.safetensors (or index); only safetensors weights are read "
        "(re-save with save_pretrained(..., safe_serialization=True))"
    )


def read_hf(directory: str | Path) -> tuple[MQAConfig, dict[str, torch.Tensor], Path | None]:
    """Our config, our state dict and the ``tokenizer.json`` path (or None) of a transformers GPTBigCode
    or Llama directory (``config.json`` + safetensors weights, sharded or not). Models and tokenizers
    are built from them by :mod:`mqa_lm.pretrained.directory` (``load_pretrained``, ``from_hf``)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json; pass a transformers model directory (save_pretrained)"
        )
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HFImportError(f"{config_path} is not valid JSON ({err})") from None
    try:
        config = from_hf_config(hf, str(config_path))
    except KeyError as err:
        raise HFImportError(f"{config_path} lacks {err}, which a {hf.get('model_type')} config must have") from None
    files = hf_weight_files(directory)
    hf_state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            hf_state.update(load_file(str(name)))
        except (SafetensorError, OSError, ValueError) as err:
            raise HFImportError(f"{name} is corrupt or truncated ({err})") from None
    family = hf["model_type"]
    if family == "gpt_bigcode" and config.tie_embeddings and "lm_head.weight" in hf_state:
        if not torch.equal(hf_state["lm_head.weight"], hf_state["transformer.wte.weight"]):
            config = replace(config, tie_embeddings=False)
    try:
        state = from_hf_state_dict(config, hf_state, family)
    except KeyError as err:
        raise HFImportError(f"{directory}: weight {err} is missing for a {family} model of this config") from None
    tokenizer_path = directory / "tokenizer.json"
    return config, state, tokenizer_path if tokenizer_path.is_file() else None
