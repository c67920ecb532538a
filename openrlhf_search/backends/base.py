"""The backend protocol and registry (see :mod:`openrlhf_search.backends`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from openrlhf_search.registry import Registry

__all__ = ["Backend", "BACKENDS", "RunOptions", "Plan"]


@dataclass
class RunOptions:
    """How the command line asked for the run."""

    mode: str = "fresh"
    """Run directory mode: ``fresh``, ``resume`` (an error without a checkpoint), ``resume_or_start`` or
    ``overwrite``."""
    dry_run: bool = False
    """Plan only: print the plan, run nothing (data files and index directories need not exist yet)."""
    prog: str = "openrlhf-search train"
    """Prefix of the messages."""


@runtime_checkable
class Plan(Protocol):
    """What a backend will run; ``render()`` is the ``--dry-run`` text."""

    def render(self) -> str: ...


class Backend(Protocol):
    """One way to run training (see the module docstring)."""

    description: str
    """One line for ``--help`` and the docs."""

    def validate(self, cfg: Any, options: RunOptions) -> list[str]:
        """Every problem of ``cfg`` this backend adds to the common config check, one line each (``[]`` if none)."""
        ...

    def plan(self, cfg: Any, options: RunOptions) -> Plan:
        """The run, built without side effects from a config :meth:`validate` accepted."""
        ...

    def run(self, plan: Plan, options: RunOptions) -> int:
        """Run ``plan``; the process exit code (0 = done)."""
        ...


BACKENDS: Registry[Backend] = Registry("backend")
"""Backend name -> :class:`Backend` (``local``, ``openrlhf``, ``megatron`` and those plugins register)."""
