"""The registry of config sections: every section dataclass is registered where its owner declares it.

``SECTIONS`` maps a section's dotted path in the training config (``model``, ``env``, ``openrlhf``,
``megatron.parallel``...) to its dataclass. ``openrlhf-search config SECTION`` and the reference table of
``docs/trainer.md`` read it; a plugin registers its own section (e.g. a plugin backend's options) and the loader then
accepts it at the top level of the YAML under that name.
"""

from __future__ import annotations

from typing import TypeVar

from openrlhf_search.registry import Registry

T = TypeVar("T", bound=type)

SECTIONS: Registry[type] = Registry("config section")
"""Section path -> dataclass (built-in sections and those plugins add)."""


def section(name: str):
    """Class decorator registering a section dataclass as ``name`` (``@section("openrlhf")``)."""

    def deco(cls: T) -> T:
        SECTIONS.add(name, cls)
        return cls

    return deco
