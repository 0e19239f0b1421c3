"""``python train.py init_from=...``: start training from a pretrained model's weights.

``init_from`` is ``hf:<dir>`` (a transformers GPTBigCode or Llama directory) or anything
:func:`mqa_lm.pretrained.directory.load_pretrained` reads (an export directory, a run directory, a ``.ckpt``).
The pretrained model decides the architecture (every :class:`MQAConfig` field except the runtime
ones in :data:`RUNTIME_FIELDS`, which keep their ``model.*`` values) and the tokenizer (the data is
tokenized with it: ``data.tokenizer=file``), so its token ids keep their meaning. Only the weights
are taken: the optimizer, schedule and step counter start fresh (``ckpt_path`` continues a run).

Two phases, so a bad config still stops before any heavy work: :func:`apply_init_from` reads the
source's config and tokenizer and rewrites ``cfg``; :func:`load_init_weights` copies the weights
into the built module.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mqa_lm.data.tokenizer import vocab_size_of
from mqa_lm.model import MQAConfig, MQATransformer

# These keep the run's model.* values: how the model runs (MQAConfig.RUNTIME_FIELDS), and the linear
# implementation, whose weights load into either kind.
RUNTIME_FIELDS = MQAConfig.RUNTIME_FIELDS | {"fc_type"}
HF_PREFIX = "hf:"
log = logging.getLogger("mqa_lm")


@dataclass
class InitSource:
    """What ``init_from`` points at: its config, its tokenizer file (or None) and a weight loader."""

    spec: str
    config: MQAConfig
    tokenizer_file: Path | None
    load_state: Callable[[], dict[str, torch.Tensor]]


def resolve_init_from(spec: str, run_dir: str | Path) -> InitSource:
    """Read the config and tokenizer of ``spec`` (weights are read later, by ``load_state``).

    A checkpoint's tokenizer (a string inside it) is written to ``<run_dir>/tokenizer.json`` so the
    datamodule can read it as a file. Raises ValueError naming ``init_from`` and the fix.
    """
    import json

    from mqa_lm.pretrained import directory as model_files
    from mqa_lm.pretrained import hf

    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        directory = Path(spec[len(HF_PREFIX) :]).expanduser()
        if not (directory / "config.json").is_file():
            raise ValueError(
                f"init_from={spec!r}: {directory} has no config.json; give a transformers model directory "
                "(hf:/path/to/dir, as written by save_pretrained)"
            )
        try:
            raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
            config = hf.from_hf_config(raw, str(directory / "config.json"))
        except KeyError as err:
            raise ValueError(f"init_from={spec!r}: config.json lacks {err}") from None
        hf.hf_weight_files(directory)  # a missing shard is found now, not after the data is prepared
        tokenizer_file = directory / "tokenizer.json"
        return InitSource(
            spec, config, tokenizer_file if tokenizer_file.is_file() else None, lambda: hf.read_hf(directory)[1]
        )

    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"init_from={spec!r} does not exist; give hf:<transformers dir>, an export directory, a run directory "
            "or a .ckpt file"
        )
    kind, source = model_files.resolve_source(path)
    if kind == "export":
        try:
            raw = json.loads((source / model_files.CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            model_files.read_export(source)  # raises the error that names the broken file
            raise
        if isinstance(raw, dict) and "model_type" in raw:
            return resolve_init_from(HF_PREFIX + str(source), run_dir)
        config = model_files.config_from_dict(raw, str(source / model_files.CONFIG_FILE))
        tokenizer_file = source / model_files.TOKENIZER_FILE
        return InitSource(
            spec,
            config,
            tokenizer_file if tokenizer_file.is_file() else None,
            lambda: model_files.read_export(source)[1],
        )
    config, state, tokenizer = model_files.read_checkpoint(source)
    written: Path | None = None
    if tokenizer is not None:
        written = model_files.write_tokenizer(Path(run_dir) / model_files.TOKENIZER_FILE, tokenizer)
    return InitSource(spec, config, written, lambda: state)


def apply_init_from(cfg: DictConfig) -> tuple[DictConfig, InitSource | None]:
    """``cfg`` with the architecture and tokenizer of ``cfg.init_from`` (unchanged when it is null)."""
    from mqa_lm.data.tokenizer import load_tokenizer

    spec = cfg.get("init_from")
    if not spec:
        return cfg, None
    source = resolve_init_from(spec, cfg.paths.output_dir)
    ours: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    merged = {**source.config.to_dict(), **{k: ours[k] for k in RUNTIME_FIELDS if k in ours}}
    ignored = [
        f"model.{k}={ours[k]!r} (pretrained: {merged[k]!r})"
        for k in sorted(ours)
        if k in merged and ours[k] is not None and ours[k] != merged[k]
    ]
    log.info("init_from=%s: architecture, tokenizer and weights of the pretrained model", spec)
    if ignored:
        log.warning("init_from=%s decides the architecture; ignored: %s", spec, ", ".join(ignored))
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.model = merged
        if source.tokenizer_file is not None:
            cfg.data.tokenizer = "file"
            cfg.data.tokenizer_path = str(source.tokenizer_file)
        elif cfg.data.get("tokenizer") != "file":
            raise ValueError(
                f"init_from={spec!r} has no tokenizer.json, and a tokenizer trained here would give its ids other "
                "meanings; pass the model's tokenizer with data.tokenizer=file "
                "data.tokenizer_path=/path/to/tokenizer.json"
            )
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    if vocab_size_of(tokenizer) > source.config.vocab_size:
        raise ValueError(
            f"data.tokenizer_path={cfg.data.tokenizer_path!r} has {vocab_size_of(tokenizer)} ids but the model of "
            f"init_from={spec!r} only {source.config.vocab_size}; use the model's own tokenizer"
        )
    return cfg, source


def load_init_weights(model: MQATransformer, source: InitSource) -> None:
    """Copy the weights of ``source`` into ``model`` (an ``MQATransformer`` built from the merged config)."""
    from mqa_lm.pretrained.directory import load_weights

    with torch.no_grad():
        load_weights(model, source.load_state(), source.spec)
