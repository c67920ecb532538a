"""Tools the model can call: the protocol (:class:`Tool`), its registry (:data:`TOOLS`) and the built-in tools.

``search`` (ranked passages, :mod:`.search`) and ``open`` (a whole document by id or title, :mod:`.open`). An
environment is configured with a list of tool names (``EnvConfig.tools``, default ``["search"]``) and each tool's
own settings (``EnvConfig.tool_options``, see :attr:`Tool.options`).
"""

from collections.abc import Sequence

from openrlhf_search.env.tools.base import TOOLS, RenderContext, Rendered, Tool, executed, tag_names
from openrlhf_search.env.tools.open import OpenTool
from openrlhf_search.env.tools.search import SearchTool, merge_hits, split_queries, turn_is_repeated

__all__ = ["TOOLS", "Tool", "Rendered", "RenderContext", "get_tools", "tool_names", "tag_names", "executed",
           "SearchTool", "OpenTool", "merge_hits", "split_queries", "turn_is_repeated"]

_RESERVED = ("answer", "think", "information", "tool_call", "tool_response")


def get_tools(names: Sequence[str], cfg) -> list[Tool]:
    """Instantiate the registered tools ``names`` with the environment config (unknown names list the valid ones;
    ``cfg.tool_options`` may only name tools of the list)."""
    if isinstance(names, str):
        raise TypeError(f"tools must be a list of names, got the string {names!r} (write [{names!r}])")
    if not names:
        raise ValueError("an environment needs at least one tool (e.g. tools: [search])")
    stray = sorted(set(getattr(cfg, "tool_options", None) or {}) - set(names))
    if stray:
        raise ValueError(f"env.tool_options names {stray}, which are not in env.tools {list(names)}")
    out: list[Tool] = []
    for n in names:
        cls = TOOLS.get(n)
        tool = cls(cfg)
        if not tool.name:
            raise ValueError(f"tool {n!r}: the class {cls.__name__} has no name")
        if tool.name in _RESERVED:
            raise ValueError(f"tool {n!r}: the name {tool.name!r} is a protocol tag")
        if any(t.name == tool.name for t in out):
            raise ValueError(f"tool {tool.name!r} is listed twice in {list(names)}")
        out.append(tool)
    return out


def tool_names() -> list[str]:
    """Names of the registered tools (every one of them is neutralized in retrieved text)."""
    return TOOLS.names()
