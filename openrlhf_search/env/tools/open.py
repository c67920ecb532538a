"""``open``: read a whole document, a page at a time, by id or title (the second tool; ASearcher's "access").

Search shows snippets; ``open`` shows the document itself. Tags: ``<open> doc id or title </open>``, a later page
with ``<open> title | 2 </open>``. Tool call: ``{"name": "open", "arguments": {"id": "..."}}`` (or ``"title"``),
with an optional ``"page": 2``. Arguments: ``{"target": str, "page": int}`` (pages count from 1).

Documents come from the retriever's corpus through ``retriever.get_documents(ids_or_titles)`` (one call per turn
for every live trajectory): the in-process indexes read their document store, ``HTTPRetriever`` asks the server's
``POST /documents``. A target matches a passage id exactly, else a title (case and spacing ignored); the document is
every passage sharing that title, in corpus order (a chunked Wikipedia article is read whole).

Rendering: ``Doc (Title: ...) [page p of n] text`` where a page holds ``EnvConfig.open_page_tokens`` tokens (default
``max_obs_tokens``); the text is neutralized like every retrieved text; an unknown target or a page past the end
renders a one-line notice (no document id is recorded then).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from openrlhf_search.env.observation import neutralize, truncate_to_tokens
from openrlhf_search.env.tools.base import TOOLS, RenderContext, Rendered, Tool, executed

__all__ = ["OpenTool", "paginate"]


def paginate(text: str, tokenizer, page_tokens: int) -> list[str]:
    """Split ``text`` into consecutive pieces of at most ``page_tokens`` tokens (exact prefixes, nothing lost)."""
    pages, rest = [], text
    while rest.strip():
        head, cut = truncate_to_tokens(rest, tokenizer, page_tokens)
        if not head:  # a single token longer than the page: take it whole rather than loop forever
            head = rest[: max(1, len(rest) // 2)]
        pages.append(head)
        rest = rest[len(head) :] if cut else ""
    return pages or [""]


@TOOLS.register("open")
class OpenTool(Tool):
    """The full text of one corpus document, paginated (``retriever.get_documents``)."""

    name = "open"
    description = "Open a document of the collection by its id or title and read it page by page."
    parameters = {"type": "object", "properties": {
        "id": {"type": "string", "description": "document id or title (as shown in search results)"},
        "page": {"type": "integer", "description": "page to read, from 1 (default 1)"}}, "required": ["id"]}
    instruction = ("To read a whole document, write its id or title inside <open></open>; for a later page, put "
                   "| and the page number after the title.")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        page = getattr(cfg, "open_page_tokens", None)
        self.page_tokens = int(page) if page else int(cfg.max_obs_tokens)

    @staticmethod
    def _args(target, page) -> tuple[dict, str | None]:
        if not isinstance(target, str) or not target.strip():
            return {}, "open needs a document id or title"
        try:
            page = int(page)
        except (TypeError, ValueError):
            return {}, f"open: page must be a number, got {page!r}"
        if page < 1:
            return {}, f"open: pages count from 1, got {page}"
        return {"target": " ".join(target.split()).strip("\"'"), "page": page}, None

    def parse_tag(self, body: str) -> tuple[dict, str | None]:
        m = re.fullmatch(r"(.*?)\s*\|\s*(?:page\s*)?(\d+)\s*", body, re.S | re.I)
        return self._args(m.group(1), m.group(2)) if m else self._args(body, 1)

    def parse_arguments(self, args: dict) -> tuple[dict, str | None]:
        target = args.get("id", args.get("title", args.get("target")))
        return self._args(target, args.get("page", 1))

    def check_retriever(self, retriever) -> None:
        if not callable(getattr(retriever, "get_documents", None)):
            raise TypeError(f"tool 'open' needs a retriever with get_documents(ids_or_titles) (the in-process "
                            f"indexes and HTTPRetriever have it); got {type(retriever).__name__}")

    def execute(self, calls: list[dict], retriever) -> list:
        docs = retriever.get_documents([c["target"] for c in calls])
        if len(docs) != len(calls):
            raise ValueError(f"get_documents returned {len(docs)} documents for {len(calls)} targets")
        return list(docs)

    def render(self, args: dict, result, ctx: RenderContext) -> Rendered:
        target, page = args["target"], args["page"]
        if result is None:
            return Rendered(neutralize(f"No document matches {target!r}.", ctx.specials))
        pages = paginate(result.text, ctx.tokenizer, self.page_tokens)
        title = neutralize(result.title or result.id, ctx.specials)
        if page > len(pages):
            return Rendered(f"Doc (Title: {title}) has only {len(pages)} page(s).")
        head = f"Doc (Title: {title}) [page {page} of {len(pages)}] "
        body, _ = truncate_to_tokens(head + neutralize(pages[page - 1].strip(), ctx.specials), ctx.tokenizer,
                                     ctx.budget)
        return Rendered(body, [result.id])

    def record(self, turn, args: dict) -> None:
        turn.args = dict(args)

    def metric_names(self) -> list[str]:
        return ["open/num_opens", "open/num_not_found"]

    def metrics(self, turns: Sequence) -> dict[str, float]:
        done = [t for t in turns if executed(t, self.name)]
        return {"open/num_opens": float(len(done)), "open/num_not_found": float(sum(not t.doc_ids for t in done))}
