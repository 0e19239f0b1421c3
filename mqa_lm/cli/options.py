"""The options that name a trained model and where it runs, shared by ``generate.py`` and ``eval.py``
(the ``model_source/_base`` node of :mod:`mqa_lm.cli.config_store` puts them at each config's root)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mqa_lm.cli.main import UsageError
from mqa_lm.pretrained.placement import check_device, check_dtype, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from mqa_lm.model import MQAConfig, MQATransformer

SOURCES = "a run directory, a .ckpt file or an export directory"


class ModelLoadError(ValueError):
    """``ckpt_path`` names something that holds no loadable model (an empty directory, a damaged
    file, no tokenizer where one is needed): printed as one ``error:`` line, exit status 2."""


@dataclass
class ModelSource:
    """Which trained model a command loads, and on what device and in what precision.

    Attributes:
        ckpt_path: required: a run directory (``outputs/<date>/<time>-<id>``), a Lightning ``.ckpt``
            or an export directory (``model.safetensors`` + ``config.json``).
        tokenizer_path: a ``tokenizer.json``, for checkpoints that carry none.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:<index>``.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), or ``fp32`` / ``bf16`` / ``fp16``.
    """

    ckpt_path: str | None = None
    tokenizer_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    @classmethod
    def from_config(cls, cfg: Any) -> ModelSource:
        """The four options of a composed config (a DictConfig or a mapping), checked: a
        :class:`UsageError` naming the first bad one, before anything is loaded (a ``cuda`` device
        on a machine without one included)."""
        source = cls(**{key: cfg[key] for key in ("ckpt_path", "tokenizer_path", "device", "dtype")})
        source.check()
        return source

    def check(self) -> None:
        if self.ckpt_path is None:
            raise UsageError("ckpt_path is required: pass ckpt_path=<run directory | .ckpt file | export directory>")
        if not self.path.exists():
            raise UsageError(f"ckpt_path={self.ckpt_path!r} does not exist; pass {SOURCES}")
        if self.tokenizer_path is not None and not Path(str(self.tokenizer_path)).expanduser().is_file():
            raise UsageError(f"tokenizer_path={self.tokenizer_path!r} is not a file; give the path of a tokenizer.json")
        try:
            resolve_device(check_device(self.device))  # cuda on a machine without one is refused here
            check_dtype(self.dtype)
        except ValueError as err:
            raise UsageError(str(err)) from None

    @property
    def path(self) -> Path:
        return Path(str(self.ckpt_path)).expanduser()

    def peek_config(self) -> MQAConfig | None:
        """The model's config where it can be read without loading the weights (an export
        directory's ``config.json``, or a run's export), else None; None too for anything
        :meth:`load` would refuse, which it then reports."""
        import json

        from mqa_lm.pretrained.directory import CONFIG_FILE, config_from_dict, resolve_source

        try:
            kind, where = resolve_source(self.path)
            if kind != "export":
                return None
            raw = json.loads((where / CONFIG_FILE).read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or "model_type" in raw:  # a transformers directory: mapped at load
                return None
            return config_from_dict(raw, str(where / CONFIG_FILE))
        except (ValueError, OSError):
            return None

    def load(self) -> tuple[MQATransformer, Tokenizer, torch.device, torch.dtype]:
        """The model on its device and dtype, its tokenizer (required: both commands turn text into ids),
        the device and the dtype.

        A source that holds no model, a damaged file or a missing tokenizer is a :class:`ModelLoadError`
        saying what to pass instead."""
        from mqa_lm.pretrained.directory import load_pretrained

        device = resolve_device(str(self.device))
        dtype = resolve_dtype(str(self.dtype), device)
        extra = {"tokenizer_path": str(Path(str(self.tokenizer_path)).expanduser())} if self.tokenizer_path else {}
        try:
            model, tokenizer = load_pretrained(
                str(self.path), device=device, dtype=dtype, require_tokenizer=True, **extra
            )
        # PretrainedError (MissingTokenizerError), HFImportError and OSError name the file and the fix.
        except (ValueError, OSError) as err:
            raise ModelLoadError(str(err)) from None
        assert tokenizer is not None  # require_tokenizer=True
        return model, tokenizer, device, dtype
