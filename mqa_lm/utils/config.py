"""The validated config dataclasses' shared pieces: plain-dict round trips and the integer check.

Checkpoints store hyperparameters as plain containers (so they load with ``weights_only=True``);
these two methods are the only way in and out, and an unknown key is an error naming the group.
"""

from __future__ import annotations

import numbers
import typing
from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="DictRoundTrip")


class DictRoundTrip:
    """Mixin for dataclasses: ``to_dict()`` and ``from_dict()`` that rejects unknown keys and, for
    fields annotated ``float`` (``float | None``, ``list[float]``), values that are not numbers."""

    config_group: ClassVar[str] = "config"
    key_prefix: ClassVar[str] = ""  # what error messages put before a field's name ("optim.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.config_group} keys {unknown}; valid keys are: {', '.join(sorted(known))}")
        check_numbers(cls, values, cls.key_prefix)
        return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_numbers(cls: type, values: dict[str, Any], prefix: str) -> None:
    """:class:`BadValueError` naming ``prefix`` + the field for a value of a ``float`` field (of the
    dataclass ``cls``) that is not a real number: a command-line typo (``optim.lr=1e-3x``) would
    otherwise fail later as a bare comparison error (``'>' not supported between 'str' and 'int'``)."""
    for name, hint in typing.get_type_hints(cls).items():
        if name not in values:
            continue
        value, args = values[name], typing.get_args(hint)
        if hint is float:
            ok, want = _is_number(value), "a number"
        elif typing.get_origin(hint) in (typing.Union, type(int | None)) and set(args) == {float, type(None)}:
            ok, want = value is None or _is_number(value), "a number or null"
        elif typing.get_origin(hint) is list and args == (float,):
            ok = isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
            want = "a list of numbers"
        else:
            continue
        if not ok:
            raise BadValueError(f"{prefix}{name} must be {want}, got {value!r}")


class BadValueError(ValueError, TypeError):
    """A config value or argument of the wrong type or out of range. Both a ValueError and a
    TypeError, so callers that catch either (config checks catch ValueError, argument checks of the
    block API promise TypeError for a non-integer) see it."""


def is_int(value: Any) -> bool:
    """An integer, not a bool (``True`` is an ``int`` to Python, never a count to a config)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(
    value: Any,
    key: str,
    *,
    minimum: int | None = 1,
    maximum: int | None = None,
    none_ok: bool = False,
    hint: str = "",
) -> Any:
    """``value`` as an ``int`` when it is an integer in ``[minimum, maximum]`` (either bound None: open);
    None when ``none_ok`` and it is None. Otherwise ValueError naming ``key``:
    ``<key> must be [null or ]an integer >= 1, got <value!r>[; <hint>]``. The one check behind every
    integer option of the package (config fields, CLI options, function arguments). Raises
    :class:`BadValueError` (a ValueError and a TypeError)."""
    if value is None and none_ok:
        return None
    if is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return int(value)
    if minimum is not None and maximum is not None:
        want = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        want = f"an integer >= {minimum}"
    elif maximum is not None:
        want = f"an integer <= {maximum}"
    else:
        want = "an integer"
    null = "null or " if none_ok else ""
    raise BadValueError(f"{key} must be {null}{want}, got {value!r}" + (f"; {hint}" if hint else ""))
