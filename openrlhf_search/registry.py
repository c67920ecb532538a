"""The one plugin mechanism: a name -> object registry, used for every user-selectable name.

Losses, loss aggregations, advantage estimators, advantage post-processors (CalibAdv), retriever kinds, the OpenRLHF
launcher's native-feature tables, rewards, templates and tools are each one :class:`Registry`. Why a registry and not
``if name == ...`` chains (verl ``core_algos.py`` does the same): a user adds an entry from their own module with
``@REGISTRY.register("mine")`` and selects it by name from a YAML config; every front end (local trainer, OpenRLHF
agent and actors, Megatron actors) dispatches the same way.

A user module is made visible to every process by listing it in the config's top-level ``plugins:`` (see
:mod:`openrlhf_search.plugins`): each process imports those modules before it resolves a name, so nothing depends on
an import side effect of the driver.

Registering a name twice is an error so that two plugins cannot silently shadow each other; an unknown name lists the
valid ones and suggests the nearest ("did you mean").
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name (a ``KeyError`` whose message prints without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, candidates: Iterable[str], hints: dict[str, str] | None = None) -> str:
    """``" (did you mean 'x'?)"`` for the nearest candidate(s) of ``name``, or ``""``.

    ``hints`` maps a near-miss pattern (a lowercase substring of ``name``) to an extra sentence appended when it
    matches (e.g. ``soft`` -> what ``sapo`` means here).
    """
    candidates = list(candidates)
    low = str(name).lower()
    close = difflib.get_close_matches(low, candidates, n=2, cutoff=0.6)
    close += [c for c in candidates if c not in close and len(low) >= 3 and (low in c or c in low)][:2]
    text = f" (did you mean {' or '.join(repr(c) for c in close[:2])}?)" if close else ""
    for hint in dict.fromkeys(h for p, h in (hints or {}).items() if p in low):
        text += f". {hint}" if text else f" -- {hint}"
    return text


class Registry(Generic[T]):
    """A named collection of objects (usually factories) of one kind.

    Args:
        kind: what is registered, used in error messages (e.g. ``"policy loss"``).
        hints: near-miss sentences for :func:`did_you_mean` (pattern -> sentence).
    """

    def __init__(self, kind: str, hints: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.hints = dict(hints or {})
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
        """Return the object registered as ``name``; unknown names raise :class:`UnknownNameError` (a ``KeyError``)
        listing the valid ones and the nearest."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        """The error text for an unknown ``name`` (valid names + "did you mean")."""
        return (f"unknown {self.kind} {name!r}{did_you_mean(str(name), self._items, self.hints)}; valid names: "
                f"{', '.join(sorted(self._items))}")  # fmt: skip

    def check(self, name: str) -> str | None:
        """``None`` if ``name`` is registered, else the :meth:`unknown_message` (for one-pass validation)."""
        return None if name in self._items else self.unknown_message(name)

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs, sorted by name."""
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
