"""Package exports imported on first use (PEP 562), so ``import mqa_lm`` or ``import mqa_lm.training``
costs nothing until a name is used, and ``from mqa_lm import generate`` loads generation alone."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose name ``X`` lives in the module ``exports[X]``.
    A name is imported once and then kept in the package's namespace, so later lookups do not come
    back here. Packages list the same imports under ``TYPE_CHECKING`` for type checkers and
    import-linter."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
