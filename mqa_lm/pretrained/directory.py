"""Self-contained models: a directory of ``model.safetensors`` + ``config.json`` + ``tokenizer.json``.

:func:`save_pretrained` writes one; :func:`load_pretrained` reads one back, or a training run
directory (``outputs/<date>/<time>/``: its ``model/`` export, else ``checkpoints/last.ckpt``), or a
Lightning ``.ckpt`` file (loaded with ``weights_only=True``; the model is rebuilt from the saved
hyperparameters and the tokenizer comes from the checkpoint itself).

Layout of an export directory::

    config.json         the MQAConfig fields (MQAConfig.from_dict(json.load(...)) rebuilds it)
    model.safetensors   the MQATransformer state dict; a tied LM head is stored once, as wte.weight
    tokenizer.json      the tokenizers.Tokenizer the ids mean (absent when none was given)
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from mqa_lm.data.tokenizer import vocab_size_of
from mqa_lm.model import MQAConfig
from mqa_lm.pretrained.checkpoint import CheckpointError, load_weights_only, verify_checkpoint
from mqa_lm.pretrained.hf import read_hf
from mqa_lm.utils.files import atomic_write

if TYPE_CHECKING:
    from mqa_lm.model import MQATransformer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# A training run's export lives in <run_dir>/model/; its checkpoints in <run_dir>/checkpoints/.
RUN_EXPORT_DIR = "model"
RUN_LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Keys of the Lightning checkpoint dict written by MQALitModule.on_save_checkpoint.
CHECKPOINT_TOKENIZER_KEY = "tokenizer"
TIED_HEAD = "lm_head.weight"

log = logging.getLogger("mqa_lm")

ACCEPTED = (
    "a directory written by save_pretrained (model.safetensors + config.json), a run directory "
    "(outputs/<date>/<time>/) or a Lightning .ckpt file"
)


class PretrainedError(ValueError):
    """A model directory or checkpoint that cannot be loaded or written; the message names the fix."""


class MissingTokenizerError(PretrainedError):
    """The model loaded, but no tokenizer was saved with it and one is needed."""


# ---- saving -----------------------------------------------------------------------------------


def save_pretrained(
    model: MQATransformer, directory: str | Path, tokenizer: Tokenizer | None = None, *, overwrite: bool = False
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``directory`` as ``model.safetensors`` + ``config.json``
    (+ ``tokenizer.json``); returns the directory.

    Each file is written to a temp name and renamed into place, so a reader never sees half a file.
    A directory that already holds a different model (its ``config.json`` differs in any field but
    ``attn_impl``/``verbose``) is refused unless ``overwrite=True``; the same architecture is taken
    as a newer version of the same model (a run updating its own export).
    """
    return write_export(directory, model.config, model.state_dict(), tokenizer, overwrite=overwrite)


def write_export(
    directory: str | Path,
    config: MQAConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """:func:`save_pretrained` from a config and an ``MQATransformer`` state dict (for callers that
    hold no module, e.g. a state dict gathered from FSDP shards)."""
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    check_export_target(directory, config, overwrite=overwrite)
    tensors = export_tensors(config, state_dict)
    directory.mkdir(parents=True, exist_ok=True)
    # Weights last: an export interrupted before them has no model.safetensors and says so on load.
    if tokenizer is not None:
        write_tokenizer(directory / TOKENIZER_FILE, tokenizer)
    with atomic_write(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with atomic_write(directory / MODEL_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "mqa-lm"})
    return directory


def write_tokenizer(path: str | Path, tokenizer: Tokenizer) -> Path:
    """Save ``tokenizer`` as ``tokenizer.json`` at ``path``, atomically."""
    path = Path(path).expanduser()
    with atomic_write(path) as tmp:
        tmp.write_text(tokenizer.to_str(), encoding="utf-8")
    return path


def export_tensors(config: MQAConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to store: CPU, contiguous, a tied LM head left out (it is ``wte.weight``)."""
    tensors = {}
    for name, tensor in state_dict.items():
        if name == TIED_HEAD and config.tie_embeddings:
            continue
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def check_export_target(directory: Path, config: MQAConfig, *, overwrite: bool = False) -> None:
    """Refuse to write ``config``'s model over a different model's export in ``directory``."""
    if directory.exists() and not directory.is_dir():
        raise PretrainedError(f"{directory} exists and is not a directory; choose a directory to save the model in")
    if overwrite:
        return
    existing = directory / CONFIG_FILE
    if not existing.is_file():
        if (directory / MODEL_FILE).exists():
            raise PretrainedError(
                f"{directory} holds a {MODEL_FILE} without a {CONFIG_FILE}, so it cannot be told apart from another "
                "model; choose another directory or pass overwrite=True"
            )
        return
    try:
        theirs = json.loads(existing.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        theirs = None
    ours = config.to_dict()
    if not isinstance(theirs, dict):
        differs = ["(unreadable config.json)"]
    else:
        differs = [
            f"{k} {theirs.get(k, '<missing>')!r} -> {ours.get(k, '<missing>')!r}"
            for k in sorted(set(theirs) | set(ours))
            if k not in MQAConfig.RUNTIME_FIELDS and theirs.get(k, "<missing>") != ours.get(k, "<missing>")
        ]
    if differs:
        raise PretrainedError(
            f"{directory} already holds a different model ({'; '.join(differs)}); choose another directory "
            "or pass overwrite=True"
        )


# ---- loading ----------------------------------------------------------------------------------


def load_pretrained(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    tokenizer_path: str | Path | None = None,
    require_tokenizer: bool = False,
    attn_impl: str | None = None,
) -> tuple[MQATransformer, Tokenizer | None]:
    """Load a model and its tokenizer from ``path``.

    Args:
        path: an export directory (``model.safetensors`` + ``config.json``; a transformers GPTBigCode
            or Llama directory is read through :func:`mqa_lm.pretrained.hf.read_hf`), a run directory
            (``outputs/<date>/<time>/``: its ``model/`` export, the best model by val loss, else
            ``checkpoints/last.ckpt``) or a Lightning ``.ckpt`` file.
        device, dtype: where and in what dtype to put the model; ``dtype=None`` keeps the dtype
            the weights were stored in.
        tokenizer_path: a ``tokenizer.json`` to use instead of the saved one (e.g. for a
            checkpoint written before checkpoints carried their tokenizer). When the model has a
            saved tokenizer, one of another vocabulary size is refused and one of the same size
            but other content is used with a one-line warning (:func:`check_tokenizer_override`).
        require_tokenizer: raise :class:`MissingTokenizerError` (naming the fix) when no tokenizer
            is found, instead of returning ``None`` for it.
        attn_impl: run the model with this attention backend instead of the saved one (e.g.
            ``torch`` on a CPU for a model trained with ``flash``).

    Returns:
        ``(model in eval mode, tokenizer or None)``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass {ACCEPTED}")
    kind, source = resolve_source(path)
    if kind == "export":
        config, state, tokenizer = read_export(source)
    else:
        config, state, tokenizer = read_checkpoint(source)
        if tokenizer is None:
            # A checkpoint of a run that saved its tokenizer next to the checkpoints directory.
            run_tokenizer = source.parent.parent / TOKENIZER_FILE
            if source.parent.name == RUN_LAST_CHECKPOINT.parent.name and run_tokenizer.is_file():
                tokenizer = read_tokenizer(run_tokenizer)
    if tokenizer_path is not None:
        given = read_tokenizer(Path(tokenizer_path).expanduser())
        if tokenizer is not None:
            check_tokenizer_override(tokenizer, given, tokenizer_path, source)
        tokenizer = given
    if tokenizer is None and require_tokenizer:
        if kind == "checkpoint":
            raise MissingTokenizerError(
                f"{source} has no tokenizer: this checkpoint predates saved tokenizers; pass "
                "tokenizer_path=<data cache>/tokenizer.json (the prepared data directory of its run, under "
                "data.cache_dir) or retrain"
            )
        raise MissingTokenizerError(
            f"{source} has no {TOKENIZER_FILE}; pass tokenizer_path=/path/to/tokenizer.json, or save the model "
            "with save_pretrained(model, directory, tokenizer)"
        )
    if tokenizer is not None and vocab_size_of(tokenizer) > config.vocab_size:
        raise PretrainedError(
            f"the tokenizer has {vocab_size_of(tokenizer)} ids but the model of {source} only {config.vocab_size}: "
            "they were not trained together; pass the tokenizer_path of the model's own tokenizer"
        )
    if attn_impl is not None:
        config = replace(config, attn_impl=attn_impl)
    model = build_model(config, state, source, device)
    stored = state["wte.weight"].dtype
    model.to(device=device, dtype=dtype or stored)
    return model.eval(), tokenizer


def check_tokenizer_override(saved: Tokenizer, given: Tokenizer, given_path: str | Path, source: Path) -> None:
    """``tokenizer_path`` replaces the tokenizer saved with a model: refuse one of another vocabulary
    size (:class:`PretrainedError` naming both sizes; its ids would decode to other text), and warn in
    one line about one of the same size whose content differs (which may be intended, e.g. a fixed
    decoder)."""
    n_saved, n_given = vocab_size_of(saved), vocab_size_of(given)
    if n_given != n_saved:
        raise PretrainedError(
            f"tokenizer_path={given_path} has {n_given} ids but the tokenizer saved with {source} has {n_saved}: "
            "the model's ids would decode to other text; leave tokenizer_path unset to use the model's own "
            "tokenizer, or pass the tokenizer.json it was trained with"
        )
    if tokenizer_sha256(given) != tokenizer_sha256(saved):
        log.warning(
            "tokenizer_path=%s differs from the tokenizer saved with %s (same %d ids, other content): using it, "
            "though ids may decode to other text; leave tokenizer_path unset to use the saved one",
            given_path,
            source,
            n_given,
        )


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of a tokenizer's canonical JSON (``to_str``): equal for the same tokenizer however its
    file was formatted."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def resolve_source(path: Path) -> tuple[str, Path]:
    """``("export", directory)`` or ``("checkpoint", file)`` for a path given to :func:`load_pretrained`."""
    if path.is_file():
        if path.name in (MODEL_FILE, CONFIG_FILE):
            return "export", path.parent
        return "checkpoint", path
    if (path / MODEL_FILE).exists() or (path / CONFIG_FILE).exists():
        return "export", path
    if (path / ".metadata").is_file():
        raise PretrainedError(
            f"{path} is a sharded (FSDP) checkpoint directory, which cannot be loaded outside its training job; "
            f"load the run's {RUN_EXPORT_DIR}/ export, or train with trainer.strategy.state_dict_type=full"
        )
    if (path / RUN_EXPORT_DIR / MODEL_FILE).exists():
        return "export", path / RUN_EXPORT_DIR
    last = path / RUN_LAST_CHECKPOINT
    if last.is_dir():
        return resolve_source(last)
    if last.is_file():
        return "checkpoint", last
    raise PretrainedError(
        f"{path} holds no model: found neither {MODEL_FILE} + {CONFIG_FILE}, "
        f"nor a run's {RUN_EXPORT_DIR}/{MODEL_FILE}, nor {RUN_LAST_CHECKPOINT}; pass {ACCEPTED}"
    )


def read_tokenizer(path: Path) -> Tokenizer:
    """A ``tokenizer.json``; a missing or malformed file is a :class:`PretrainedError` naming it."""
    if not path.is_file():
        raise PretrainedError(f"tokenizer {str(path)!r} does not exist; give the path of a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise PretrainedError(
            f"{path} is not a valid tokenizer.json ({err}); re-save it, or pass tokenizer_path=<another tokenizer.json>"
        ) from None


def read_export(directory: Path) -> tuple[MQAConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """Config, tensors and tokenizer (or None) of an export directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, model_path = directory / CONFIG_FILE, directory / MODEL_FILE
    if not config_path.is_file():
        raise PretrainedError(
            f"{directory} has no {CONFIG_FILE}: the export is incomplete (interrupted while saving?); "
            "save it again or load the run's checkpoint instead"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{config_path} is not valid JSON ({err}); save the model again") from None
    if isinstance(raw, dict) and "model_type" in raw:
        # A transformers directory (GPTBigCode / Llama; weights possibly sharded): mqa_lm.pretrained.hf maps it.
        config, state, tokenizer_path = read_hf(directory)
        return config, state, read_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if not model_path.is_file():
        raise PretrainedError(
            f"{directory} has no {MODEL_FILE}: the export is incomplete (interrupted while saving?); "
            "save it again or load the run's checkpoint instead"
        )
    config = config_from_dict(raw, str(config_path))
    try:
        state = load_file(str(model_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PretrainedError(f"{model_path} is corrupt or truncated ({err}); save the model again") from None
    tokenizer_file = directory / TOKENIZER_FILE
    tokenizer = read_tokenizer(tokenizer_file) if tokenizer_file.exists() else None
    return config, state, tokenizer


def read_checkpoint(path: Path) -> tuple[MQAConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """Config, model tensors and tokenizer (or None) of a Lightning checkpoint of ``MQALitModule``."""
    try:
        verify_checkpoint(path)  # zip CRCs, weights_only, state_dict present: one clear error each
        ckpt = load_weights_only(path, mmap=zipfile.is_zipfile(path))
    except CheckpointError as err:
        raise PretrainedError(str(err)) from None
    hparams = ckpt.get("hyper_parameters") or {}
    model_fields = hparams.get("model") if isinstance(hparams, dict) else None
    if not isinstance(model_fields, dict) or model_fields.get("vocab_size") is None:
        raise PretrainedError(
            f"{path} is not an mqa-lm training checkpoint (no hyper_parameters['model'] with a vocab_size); "
            "pass a checkpoint written by python train.py"
        )
    config = config_from_dict(model_fields, f"{path} hyper_parameters['model']")
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    tokenizer = None
    saved = ckpt.get(CHECKPOINT_TOKENIZER_KEY)
    if saved is not None:
        try:
            tokenizer = Tokenizer.from_str(saved)
        except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
            raise PretrainedError(
                f"{path} carries a tokenizer that does not parse ({err}); pass tokenizer_path=<its tokenizer.json>"
            ) from None
    return config, state, tokenizer


def config_from_dict(raw: Any, where: str) -> MQAConfig:
    """MQAConfig from a saved dict; an unknown key or invalid value is a :class:`PretrainedError`."""
    if not isinstance(raw, dict):
        raise PretrainedError(f"{where} must be a JSON object of MQAConfig fields, got {type(raw).__name__}")
    try:
        return MQAConfig.from_dict(raw)
    except (ValueError, TypeError) as err:
        known = ", ".join(f.name for f in fields(MQAConfig))
        raise PretrainedError(f"{where} is not a valid model config: {err} (MQAConfig fields: {known})") from None


def build_model(
    config: MQAConfig, state: Mapping[str, torch.Tensor], source: Path, device: torch.device | str | None = None
) -> MQATransformer:
    """An ``MQATransformer`` of ``config`` on ``device`` (default CPU) holding exactly ``state``; a
    missing, extra or misshapen tensor is one :class:`PretrainedError` listing them."""
    from mqa_lm.model import MQATransformer

    # Built where it will run: the random init, overwritten at once, is then a few kernels on a GPU
    # instead of ~3 s of the CPU for a GPT-2-small (the meta device would cost ~1 s of first use);
    # it must not advance the caller's RNG there either.
    target = torch.device(device if device is not None else "cpu")
    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []), target:
        model = MQATransformer(config)
    load_weights(model, state, source)
    return model


def load_weights(model: MQATransformer, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``state`` into ``model``; a missing, extra or misshapen tensor is one :class:`PretrainedError`."""
    config = model.config
    state = dict(state)
    if config.tie_embeddings and TIED_HEAD not in state and "wte.weight" in state:
        state[TIED_HEAD] = state["wte.weight"]
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {list(state[k].shape)}, the config needs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if config.tie_embeddings and TIED_HEAD in state and not torch.equal(state[TIED_HEAD], state["wte.weight"]):
        problems.append("lm_head.weight differs from wte.weight though tie_embeddings is true")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise PretrainedError(f"the weights of {source} do not match its model config: {shown}")
    model.load_state_dict(state, strict=True)


def from_hf(
    directory: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[MQATransformer, Tokenizer | None]:
    """Load a transformers GPTBigCode or Llama directory as an ``MQATransformer`` (eval mode) and its
    ``tokenizer.json`` (or None). ``dtype=None`` keeps the stored dtype."""
    config, state, tokenizer_path = read_hf(directory)
    model = build_model(config, state, Path(directory))
    model.to(device=device, dtype=dtype or state["wte.weight"].dtype)
    return model.eval(), read_tokenizer(tokenizer_path) if tokenizer_path is not None else None
