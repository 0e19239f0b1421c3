"""A tiny name -> object registry, so swappable parts (attention backends, norms, linears) are
looked up by the string a config carries and a bad string fails with the list of good ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. ``get`` raises ``ValueError`` naming the bad key and the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str, field: str | None = None) -> T:
        """The object registered as ``name``. ``field`` is how the error names the setting
        (``model.attn_impl`` in a config); it defaults to the registry's kind (``attn_impl``)."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {field or self.kind} {name!r}; valid choices are: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def keys(self) -> list[str]:
        return sorted(self._entries)
