"""The validated config dataclasses' shared pieces: plain-dict round trips and the integer check.

Checkpoints store hyperparameters as plain containers (so they load with ``weights_only=True``);
these two methods are the only way in and out, and an unknown key is an error naming the group.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from collections.abc import Mapping
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


def _wanted_number(hint: Any, integers: bool) -> str | None:
    """What a value annotated ``hint`` must be, where that is a number: ``float``, a union of ``int``
    and ``float`` (``float | None``...), ``list[float]``; with ``integers``, also ``int`` and
    ``int | None``. None for every other annotation."""
    if hint is float or (integers and hint is int):
        return "a number" if hint is float else "an integer"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = set(args) - {type(None)}
        null = " or null" if type(None) in args else ""
        if float in kinds and kinds <= {int, float}:
            return "a number" + null
        if integers and kinds == {int}:
            return "an integer" + null
    if origin is list and args == (float,):
        return "a list of numbers"
    return None


def number_hints(target: Any) -> dict[str, Any]:
    """The annotations of what ``target`` takes: a dataclass's fields, a class's ``__init__``
    parameters, a function's parameters; {} where they do not resolve (names only a type checker
    imports)."""
    source = target
    if isinstance(target, type) and not dataclasses.is_dataclass(target):  # the nearest __init__ of its MRO
        source = next(vars(k)["__init__"] for k in target.__mro__ if "__init__" in vars(k))
    try:
        return typing.get_type_hints(source)
    except Exception:  # noqa: BLE001 (a third party's annotations: no check rather than a crash)
        return {}


def check_numbers(target: Any, values: Mapping[str, Any], prefix: str, integers: bool = False) -> None:
    """:class:`BadValueError` naming ``prefix`` + the key for a value that ``target`` (a dataclass, a
    class or a function: :func:`number_hints`) annotates as a number but that is not one: a
    command-line typo (``optim.lr=1e-3x``) would otherwise fail later as a bare comparison error
    (``'>' not supported between 'str' and 'int'``), or not at all until the value is used.
    ``integers``: ``int`` parameters too (where ``target``'s own checks do not name the range)."""
    for name, hint in number_hints(target).items():
        want = _wanted_number(hint, integers) if name in values else None
        if want is None:
            continue
        value = values[name]
        if want == "a list of numbers":
            ok = isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
        else:
            # None where only an integer is annotated is left to the class (Lightning takes some).
            ok = (is_int(value) if want.startswith("an integer") else _is_number(value)) or (
                value is None and (want.endswith("or null") or want == "an integer")
            )
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
