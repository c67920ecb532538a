"""A test plugin: a backend with its own config section, in one file and one registration each.

Listed in a config's ``plugins:``, it makes ``backend: dummy`` and a top-level ``dummy:`` section valid; ``train``
validates, plans and runs it like a built-in backend. The run writes what it received to ``dummy.out``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from openrlhf_search.backends.base import BACKENDS, RunOptions
from openrlhf_search.config import section


@section("dummy")
@dataclass
class DummyOptions:
    """Options of the dummy backend."""

    out: str = ""
    """File the run writes (required)."""
    greeting: str = "hello"
    """Written into the file."""


@dataclass
class DummyPlan:
    """What the dummy run will write."""

    out: Path
    record: dict

    def render(self) -> str:
        return f"# dummy backend: would write {self.record} to {self.out}"


class DummyBackend:
    description = "a test plugin's backend: writes what it received to a file"

    def validate(self, cfg, options: RunOptions) -> list[str]:
        opts = cfg.plugin_sections.get("dummy", DummyOptions())
        return [] if opts.out else ["dummy.out: the dummy backend needs a file to write (dummy: {out: PATH})"]

    def plan(self, cfg, options: RunOptions) -> DummyPlan:
        opts = cfg.plugin_sections["dummy"]
        return DummyPlan(Path(opts.out), {"greeting": opts.greeting, "steps": cfg.steps, "mode": options.mode,
                                          "algorithm": cfg.algorithm.name, "topk": cfg.env.topk})

    def run(self, plan: DummyPlan, options: RunOptions) -> int:
        plan.out.write_text(json.dumps(plan.record), encoding="utf-8")
        return 0


BACKENDS.add("dummy", DummyBackend())
