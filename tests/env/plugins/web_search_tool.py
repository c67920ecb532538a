"""A user's tool plugin (what a project outside openrlhf_search would write): a web-search tool with its own
option, in one file and one registration. Selected with ``env.tools: [search, web_search]`` and configured with
``env.tool_options: {web_search: {max_results: 2}}``; this file goes in the config's ``plugins:``.

The "web" is a fixed in-memory page list (no network in tests): results are the pages whose text shares a word with
the query, best overlap first, cut to ``max_results``."""

from dataclasses import dataclass

from openrlhf_search.env.observation import neutralize, truncate_to_tokens
from openrlhf_search.env.tools import TOOLS, Rendered, Tool

PAGES = [
    ("Lyon", "Lyon is a city in France on the Rhone."),
    ("Paris", "Paris is the capital of France."),
    ("Rhone", "The Rhone flows through Lyon to the sea."),
    ("Seine", "The Seine flows through Paris."),
]


@dataclass
class WebSearchOptions:
    max_results: int = 3
    """Pages shown per query."""
    snippet_words: int = 20
    """Words of each page shown."""

    def __post_init__(self) -> None:
        if self.max_results < 1:
            raise ValueError(f"max_results must be >= 1, got {self.max_results}")


@TOOLS.register("web_search")
class WebSearch(Tool):
    name = "web_search"
    description = "Search the web and return page snippets."
    parameters = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
    instruction = "To search the web, write a query inside <web_search></web_search>."
    options = WebSearchOptions

    def parse_tag(self, body):
        q = " ".join(body.split())
        return ({"query": q}, None) if q else ({}, "empty web query")

    def parse_arguments(self, args):
        return self.parse_tag(str(args.get("query", "")))

    def execute(self, calls, retriever):  # the backend would be an HTTP API; one request per turn in real use
        out = []
        for c in calls:
            words = set(c["query"].lower().split())
            ranked = sorted(PAGES, key=lambda p: -len(words & set(p[1].lower().rstrip(".").split())))
            out.append([p for p in ranked if words & set(p[1].lower().rstrip(".").split())][: self.opts.max_results])
        return out

    def render(self, args, result, ctx):
        lines = [f"Page {i} ({neutralize(t, ctx.specials)}) "
                 + " ".join(neutralize(text, ctx.specials).split()[: self.opts.snippet_words])
                 for i, (t, text) in enumerate(result, 1)]
        body, _ = truncate_to_tokens("\n".join(lines) or "No pages.", ctx.tokenizer, ctx.budget)
        return Rendered(body, [t for t, _ in result])
