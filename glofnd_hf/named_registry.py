"""A registry of named things (loss types, model families): each is added once, next to its
definition, and read by name everywhere else. A leaf: plain Python."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class NamedRegistry(Generic[T]):
    """Things of one ``kind`` by their ``name``, listed in the order they were registered
    (or sorted, ``sort_names``)."""

    def __init__(self, kind: str, *, sort_names: bool = False) -> None:
        self.kind = kind
        self.sort_names = sort_names
        self._items: dict[str, T] = {}

    def register(self, item: T, *, replace: bool = False) -> T:
        """Make ``item`` known by its name (``replace`` allows redefining one)."""
        if item.name in self._items and not replace:
            raise ValueError(f"{self.kind} {item.name!r} is already registered")
        self._items[item.name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove a registration (tests that add a toy)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._items) if self.sort_names else list(self._items)

    def values(self) -> list[T]:
        return [self._items[name] for name in self.names()]
