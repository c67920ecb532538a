"""Tools the model can call: the protocol (:class:`Tool`), its registry (:data:`TOOLS`) and the built-in tools.

``search`` (ranked passages, :mod:`.search`) and ``open`` (a whole document by id or title, :mod:`.open`). An
environment is configured with a list of tool names (``EnvConfig.tools``, default ``["search"]``).
"""

from openrlhf_search.env.tools.base import TOOLS, RenderContext, Rendered, Tool, get_tools, tool_names
from openrlhf_search.env.tools.open import OpenTool
from openrlhf_search.env.tools.search import SearchTool, merge_hits, split_queries, turn_is_repeated

__all__ = ["TOOLS", "Tool", "Rendered", "RenderContext", "get_tools", "tool_names", "SearchTool", "OpenTool",
           "merge_hits", "split_queries", "turn_is_repeated"]
