"""``search``: ranked passages for one or more queries (``<search> query </search>``; the first tool).

Arguments: ``{"queries": [str, ...]}``. Tags: a JSON list of strings, or queries separated by newlines or ``;``
(stripped, unquoted, deduplicated case-insensitively, at most ``EnvConfig.max_queries_per_turn``). Tool call:
``{"query": "..."}`` (one query, never split) or ``{"query": [...]}`` / ``{"queries": [...]}``.

Execution: every query of every live trajectory goes to the retriever in **one** ``retriever.search(queries, topk)``
call. Rendering: each call's hits are merged across its queries (query order, then rank; a document once, at most
``max_docs_per_turn``) and formatted as ``Doc i (Title: ...) text`` lines (:func:`~..observation.format_observation`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from openrlhf_search.env.observation import format_observation
from openrlhf_search.env.protocol import normalize_answer
from openrlhf_search.env.tools.base import TOOLS, RenderContext, Rendered, Tool, executed
from openrlhf_search.retrieval.types import Hit

__all__ = ["SearchTool", "split_queries", "merge_hits", "turn_is_repeated"]


def _unquote(q: str) -> str:
    q = q.strip()
    if len(q) >= 2 and q[0] == q[-1] and q[0] in "\"'`":
        q = q[1:-1].strip()
    return q


def _dedupe(queries: list[str], max_queries: int) -> list[str]:
    seen, out = set(), []
    for q in queries:
        key = " ".join(q.lower().split())
        if q and key not in seen:
            seen.add(key)
            out.append(q)
    return out[:max_queries]


def split_queries(body: str, max_queries: int = 4) -> list[str]:
    """Queries of a ``<search>`` body: a JSON list of strings, or newline/``;``-separated text."""
    s = body.strip()
    if s.startswith("["):
        try:
            items = json.loads(s)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list) and all(isinstance(x, str) for x in items):
            return _dedupe([_unquote(x) for x in items], max_queries)
    return _dedupe([_unquote(x) for x in re.split(r"[\n;]", s)], max_queries)


def merge_hits(per_query: Sequence[Sequence[Hit]], limit: int | None = None) -> list[Hit]:
    """Merge the hits of a turn's queries: query order then rank order, first occurrence of a doc id kept."""
    seen, out = set(), []
    for hits in per_query:
        for h in hits:
            if h.document.id not in seen:
                seen.add(h.document.id)
                out.append(h)
    return out[:limit] if limit is not None else out


def turn_is_repeated(queries: Sequence[str], doc_ids: Sequence[str], text: str, earlier: Sequence) -> bool:
    """Whether a search turn brought nothing new (CalibAdv gives such turns no credit).

    Repeated: every query was asked before (answer-normalised), or the documents it retrieved were all shown
    before, or its text equals an earlier turn's (whitespace-normalised). ``earlier`` holds the previous turns
    (anything with ``queries``, ``doc_ids`` and ``text``).
    """
    earlier_queries = {normalize_answer(q) for t in earlier for q in t.queries}
    earlier_docs = {d for t in earlier for d in t.doc_ids}
    earlier_texts = {" ".join(t.text.split()) for t in earlier}
    return (
        all(normalize_answer(q) in earlier_queries for q in queries)
        or (bool(doc_ids) and set(doc_ids) <= earlier_docs)
        or " ".join(text.split()) in earlier_texts
    )


@TOOLS.register("search")
class SearchTool(Tool):
    """Top-k passages per query from the retriever (``Retriever.search``)."""

    name = "search"
    description = "Search a text collection and return the best matching passages."
    parameters = {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}},
                  "required": ["query"]}
    instruction = "To search, write a query between <search> and </search>."
    calib_credit = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.topk = int(cfg.topk)
        self.max_queries = int(cfg.max_queries_per_turn)
        docs = getattr(cfg, "max_docs_per_turn", None)
        self.max_docs = int(docs) if docs is not None else self.topk * self.max_queries

    def parse_tag(self, body: str) -> tuple[dict, str | None]:
        queries = split_queries(body, self.max_queries)
        return ({"queries": queries}, None) if queries else ({}, "empty query")

    def parse_arguments(self, args: dict) -> tuple[dict, str | None]:
        q = args.get("query", args.get("queries"))
        if isinstance(q, str):
            items = [q]
        elif isinstance(q, list) and all(isinstance(x, str) for x in q):
            items = q
        else:
            return {}, "tool call needs 'arguments.query' as a string or a list of strings"
        queries = _dedupe([x.strip() for x in items], self.max_queries)
        return ({"queries": queries}, None) if queries else ({}, "empty query")

    def check_retriever(self, retriever) -> None:
        if not callable(getattr(retriever, "search", None)):
            raise TypeError(f"tool 'search' needs a retriever with search(queries, topk); got {type(retriever)!r}")

    def execute(self, calls: list[dict], retriever) -> list[list[list[Hit]]]:
        flat = [q for c in calls for q in c["queries"]]
        if not flat:
            return [[] for _ in calls]
        results = retriever.search(flat, self.topk)
        if len(results) != len(flat):
            raise ValueError(f"retriever returned {len(results)} result lists for {len(flat)} queries")
        out, pos = [], 0
        for c in calls:
            out.append(results[pos : pos + len(c["queries"])])
            pos += len(c["queries"])
        return out

    def record(self, turn, args: dict) -> None:
        turn.queries = list(args["queries"])

    def render(self, args: dict, result, ctx: RenderContext) -> Rendered:
        hits = merge_hits(result, self.max_docs)
        body = format_observation(hits, ctx.tokenizer, ctx.budget, ctx.specials) if ctx.budget > 0 else ""
        return Rendered(body, [h.document.id for h in hits], [float(h.score) for h in hits])

    def metric_names(self) -> list[str]:
        return ["search/num_searches", "search/num_docs"]

    def metrics(self, turns: Sequence) -> dict[str, float]:
        done = [t for t in turns if executed(t, self.name)]
        return {"search/num_searches": float(len(done)), "search/num_docs": float(sum(len(t.doc_ids) for t in done))}
