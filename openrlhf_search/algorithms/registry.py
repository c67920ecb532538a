"""A tiny name -> callable registry shared by losses and advantage estimators.

Why a registry and not ``if name == ...`` chains (verl ``core_algos.py`` does the same): a user can add a loss
from their own module with ``@register_policy_loss("mine")`` and select it by name from a YAML config, and every
front end (local trainer, OpenRLHF launcher) dispatches the same way. Registering a name twice is an error so
that two plugins cannot silently shadow each other; an unknown name lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of objects (usually factories) of one kind.

    Args:
        kind: what is registered, used in error messages (e.g. ``"policy loss"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; raises ``KeyError`` if ``name`` is taken."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` (non-decorator form)."""
        if name in self._items:
            raise KeyError(f"{self.kind} {name!r} is already registered ({self._items[name]!r}); pick another name")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; unknown names raise ``KeyError`` listing the valid ones."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
