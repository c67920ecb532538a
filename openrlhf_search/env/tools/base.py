"""The tool protocol: what a tool the model can call must say and do (``search`` and ``open`` implement it).

A tool answers to

* a **tag** in the ``tags`` protocol: ``<name> body </name>`` (the tag is the tool's :attr:`Tool.name`), parsed by
  :meth:`Tool.parse_tag`;
* a **function** in the ``tool_call`` protocol: ``<tool_call>{"name": name, "arguments": {...}}</tool_call>``, with
  the JSON schema :attr:`Tool.parameters`, parsed by :meth:`Tool.parse_arguments`.

The environment (:class:`~openrlhf_search.env.episode.Episode`) parses a turn, collects the calls of every live
trajectory, runs each tool **once per turn over the whole batch** (:meth:`Tool.execute`), renders each result into
an observation body (:meth:`Tool.render`), wraps it with the template and appends it as observation tokens: action
mask 0, log-prob 0, never trained on. :meth:`Tool.metrics` adds the tool's per-trajectory diagnostics, with the names
:meth:`Tool.metric_names` declares (the same on every backend).

Adding a tool is one file and one registration::

    @TOOLS.register("calculator")
    class Calculator(Tool):
        ...

and ``env.tools: [search, calculator]`` in the config. Built-in tools are registered by this package itself (no
import side effect of a driver module); a tool in a user module must be imported in every process that builds an
environment (vLLM rollout actors included). See docs/environment.md for a worked example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from openrlhf_search.env.protocol import TOOLS, tag_names

__all__ = ["Tool", "Rendered", "RenderContext", "TOOLS", "executed", "tag_names", "build_options"]


@dataclass
class RenderContext:
    """What :meth:`Tool.render` may use."""

    tokenizer: Any
    """Counts tokens for the budget (``None``: whitespace words)."""
    budget: int
    """Token budget of the observation body (<= 0: render nothing, only the record fields)."""
    specials: Sequence[str] = ()
    """Special/added token strings of the tokenizer: neutralize them in untrusted text."""


@dataclass
class Rendered:
    """A tool result as the model will read it, plus what the turn record keeps."""

    body: str
    """The observation body (the template adds its wrapper, e.g. ``<information>...</information>``)."""
    doc_ids: list[str] = field(default_factory=list)
    """Documents shown (``TurnRecord.doc_ids``; CalibAdv reads them for tools with ``calib_credit``)."""
    scores: list[float] = field(default_factory=list)
    """Scores aligned with ``doc_ids`` (empty when the tool has none)."""


class Tool:
    """Base class of the tools (subclass it; override the methods marked *required*).

    A tool is built once per environment with the environment config (:class:`~openrlhf_search.env.EnvConfig`)
    and must not keep per-trajectory state: the same instance serves every trajectory of the batch.
    """

    name: ClassVar[str] = ""
    """Tag (``tags`` protocol) and function name (``tool_call`` protocol); the registry name."""
    description: ClassVar[str] = ""
    """One sentence for the ``tool_call`` schema."""
    parameters: ClassVar[dict] = {}
    """JSON schema of the arguments (``tool_call`` protocol)."""
    instruction: ClassVar[str] = ""
    """How to call it in the ``tags`` protocol, added to the prompt of templates that do not describe it already."""
    calib_credit: ClassVar[bool] = False
    """Whether its turns are CalibAdv "search turns" (credited by the documents they retrieve)."""
    options: ClassVar[type | None] = None
    """The tool's own settings: a dataclass whose fields are the keys of ``env.tool_options.<name>`` in the config
    (None: the tool has none). The instance is :attr:`opts`."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.opts = build_options(type(self), getattr(cfg, "tool_options", None))  # None without options

    # ---------------------------------------------------------------------------------------------- parsing
    def parse_tag(self, body: str) -> tuple[dict, str | None]:
        """*Required.* ``(args, None)`` for the body of ``<name>body</name>``, or ``({}, why_invalid)``."""
        raise NotImplementedError

    def parse_arguments(self, args: dict) -> tuple[dict, str | None]:
        """*Required.* ``(args, None)`` from the JSON ``arguments`` object of a tool call, or ``({}, why_invalid)``."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- execution
    def check_retriever(self, retriever) -> None:
        """Raise ``TypeError`` naming what is missing if ``retriever`` cannot serve this tool (called once)."""

    def execute(self, calls: list[dict], retriever) -> list[Any]:
        """*Required.* Run every call of one turn, all live trajectories together (one backend request); returns one
        result per call, in order."""
        raise NotImplementedError

    def render(self, args: dict, result: Any, ctx: RenderContext) -> Rendered:
        """*Required.* The observation body of one call's result, within ``ctx.budget`` tokens, untrusted text
        neutralized (:func:`~openrlhf_search.env.observation.neutralize`)."""
        raise NotImplementedError

    def record(self, turn, args: dict) -> None:
        """Copy what the turn record should keep of the arguments (e.g. ``TurnRecord.queries``)."""

    # ---------------------------------------------------------------------------------------------- metrics
    def metric_names(self) -> list[str]:
        """Names of the values :meth:`metrics` returns (fixed: OpenRLHF stacks them across samples)."""
        return [f"{self.name}/calls"]

    def metrics(self, turns: Sequence) -> dict[str, float]:
        """Per-trajectory diagnostics from its :class:`~openrlhf_search.env.trajectory.TurnRecord` list."""
        return {f"{self.name}/calls": float(sum(executed(t, self.name) for t in turns))}

    # ------------------------------------------------------------------------------------------- tool_call
    def schema(self) -> dict:
        """The OpenAI/Qwen function schema (what a ``<tools>`` block lists)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def executed(turn, name: str) -> bool:
    """Whether ``turn`` called tool ``name`` and the call was run (no error)."""
    return turn.action == name and turn.error is None


def build_options(cls: type[Tool], tool_options: dict | None):
    """The :attr:`Tool.options` instance of ``cls`` from ``env.tool_options`` (its entry under the tool's name)."""
    raw = (tool_options or {}).get(cls.name)
    if cls.options is None:
        if raw:
            raise ValueError(f"env.tool_options.{cls.name}: tool {cls.name!r} takes no options, got {sorted(raw)}")
        return None
    raw = dict(raw or {})
    valid = {f.name for f in dataclasses.fields(cls.options)}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ValueError(f"env.tool_options.{cls.name}: unknown option(s) {unknown}; valid: {sorted(valid)}")
    try:
        return cls.options(**raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"env.tool_options.{cls.name}: {exc}") from exc
