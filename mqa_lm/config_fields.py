"""Plain-dict round trips for the validated config dataclasses (MQAConfig, OptimConfig).

Checkpoints store hyperparameters as plain containers (so they load with ``weights_only=True``);
these two methods are the only way in and out, and an unknown key is an error naming the group.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="DictRoundTrip")


class DictRoundTrip:
    """Mixin for dataclasses: ``to_dict()`` and ``from_dict()`` that rejects unknown keys."""

    config_group: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.config_group} keys {unknown}; valid keys are: {', '.join(sorted(known))}")
        return cls(**values)
