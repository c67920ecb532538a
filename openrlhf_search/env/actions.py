"""Parse one model turn into an action: search (with one or more queries), answer, or invalid.

Models do not write clean tags. The rules, in the order they are applied (each is covered by the table test in
``tests/env/test_actions.py``):

1. **Model-written observations are never trusted.** ``<information>...</information>`` and
   ``<tool_response>...</tool_response>`` blocks the model writes itself are blanked, as is everything after an
   unclosed one, so a fake observation cannot carry an ``<answer>`` or a query.
2. **Closed thinking is deliberation, not action.** The inside of ``<think>...</think>`` is blanked ("I could
   ``<search>x</search>``..." inside a closed think block is not a search). An *unclosed* ``<think>`` is ignored as a
   tag, so "``<think>`` let me look ``<search>x</search>``" still searches.
3. **The first complete action wins.** An action is an opening tag followed by its closing tag; among all of them,
   the one whose *closing* tag comes first is taken (this is where a stop string would have cut the generation).
   Text after it (a second search, text after ``</answer>``) is ignored. With nested same-kind tags
   (``<search><search>q</search>``) the innermost opening tag is used.
4. **A malformed first action makes the turn invalid** (no fall-through to a later action): a protocol tag nested in
   its body, an empty query, an empty answer, bad tool-call JSON, an unknown tool.
5. **Several queries in one search** (``tags`` protocol): a JSON list of strings (``<search>["a", "b"]</search>``),
   or queries separated by newlines or ``;``. Each is stripped (and unquoted), empties are dropped, duplicates
   (case-insensitive) removed, and at most ``max_queries`` kept. In the ``tool_call`` protocol, ``"query"`` may be
   a string (one query, never split) or a list of strings (also accepted under ``"queries"``).
6. **Nothing complete** -> invalid, with an error saying what was missing (unclosed ``<search>``/``<answer>``,
   a stray closing tag, or no action at all). The environment answers invalid actions with the template's fixed
   corrective observation.

Tag matching ignores case and whitespace inside the brackets (``< /Search >``), like the neutralizer in
:mod:`openrlhf_search.env.observation`, so anything the parser would accept is also neutralized in retrieved text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from openrlhf_search.rewards import tag_pattern

__all__ = ["Action", "parse_action", "split_queries", "PROTOCOL_TAG_NAMES", "ANY_TAG_RE"]

PROTOCOL_TAG_NAMES = ("think", "search", "information", "answer", "tool_call", "tool_response")
"""Every tag name of both protocols (the neutralizer escapes all of them in retrieved text)."""

ANY_TAG_RE = re.compile("|".join(tag_pattern(n, c) for n in PROTOCOL_TAG_NAMES for c in (False, True)), re.I)
"""Matches any opening or closing protocol tag."""

_CALL_TAG = {"tags": "search", "tool_call": "tool_call"}


@dataclass(frozen=True)
class Action:
    """The parsed action of one model turn."""

    kind: str
    """``search``, ``answer`` or ``invalid``."""
    queries: list[str] = field(default_factory=list)
    """Search queries (``search`` only), deduplicated, in the order written."""
    answer: str | None = None
    """The stripped answer text (``answer`` only)."""
    error: str | None = None
    """Why the action is invalid (``invalid`` only)."""
    span: tuple[int, int] | None = None
    """Character span of the action (opening tag to end of closing tag) in the parsed text."""


def _blank(text: str, start: int, end: int) -> str:
    """Replace text[start:end] with spaces (keeps character offsets stable)."""
    return text[:start] + " " * (end - start) + text[end:]


def _blank_blocks(text: str, name: str) -> str:
    """Blank closed ``<name>...</name>`` blocks, then everything from an unclosed ``<name>`` to the end."""
    block = re.compile(tag_pattern(name, False) + r".*?" + tag_pattern(name, True), re.S | re.I)
    text = block.sub(lambda m: " " * (m.end() - m.start()), text)
    m = re.search(tag_pattern(name, False), text, re.I)
    if m and name != "think":
        text = _blank(text, m.start(), len(text))
    return text


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
    """Queries of a ``<search>`` body: a JSON list of strings, or newline/``;``-separated text (rule 5)."""
    s = body.strip()
    if s.startswith("["):
        try:
            items = json.loads(s)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list) and all(isinstance(x, str) for x in items):
            return _dedupe([_unquote(x) for x in items], max_queries)
    return _dedupe([_unquote(x) for x in re.split(r"[\n;]", s)], max_queries)


def _tool_queries(body: str, max_queries: int) -> tuple[list[str], str | None]:
    s = body.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, re.S)
    if fence:
        s = fence.group(1)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as exc:
        return [], f"tool call is not valid JSON ({exc.msg} at char {exc.pos})"
    if not isinstance(obj, dict):
        return [], "tool call JSON must be an object with 'name' and 'arguments'"
    if obj.get("name") != "search":
        return [], f"unknown tool {obj.get('name')!r} (only 'search' exists)"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = {"query": args}
    if not isinstance(args, dict):
        return [], "tool call 'arguments' must be an object"
    q = args.get("query", args.get("queries"))
    if isinstance(q, str):
        items = [q]
    elif isinstance(q, list) and all(isinstance(x, str) for x in q):
        items = q
    else:
        return [], "tool call needs 'arguments.query' as a string or a list of strings"
    queries = _dedupe([x.strip() for x in items], max_queries)
    return queries, None if queries else "empty query"


def parse_action(text: str, protocol: str = "tags", max_queries: int = 4) -> Action:
    """Parse one model turn (see the module docstring for the rules).

    Args:
        text: the decoded model tokens of this turn only (not the prompt, not earlier turns).
        protocol: ``tags`` (``<search>``) or ``tool_call`` (``<tool_call>`` JSON).
        max_queries: at most this many queries are kept from one search action.
    """
    if protocol not in _CALL_TAG:
        raise KeyError(f"unknown protocol {protocol!r}; valid: {sorted(_CALL_TAG)}")
    call = _CALL_TAG[protocol]
    clean = text or ""
    for obs in ("information", "tool_response"):
        clean = _blank_blocks(clean, obs)
    clean = _blank_blocks(clean, "think")

    # The first complete action: the earliest closing tag that has an opening tag of its kind before it.
    closes = sorted(
        (m.start(), m.end(), kind)
        for kind in (call, "answer")
        for m in re.finditer(tag_pattern(kind, True), clean, re.I)
    )
    stray = None
    for c_start, c_end, kind in closes:
        opens = [m for m in re.finditer(tag_pattern(kind, False), clean[:c_start], re.I)]
        if not opens:
            stray = stray or kind
            continue
        o = opens[-1]
        body = clean[o.end() : c_start]
        span = (o.start(), c_end)
        nested = ANY_TAG_RE.search(body)
        if nested:
            return Action("invalid", error=f"tag {nested.group(0)!r} nested inside <{kind}>", span=span)
        if kind == "answer":
            ans = body.strip()
            if not ans:
                return Action("invalid", error="empty answer", span=span)
            return Action("answer", answer=ans, span=span)
        if protocol == "tags":
            queries = split_queries(body, max_queries)
            err = None if queries else "empty query"
        else:
            queries, err = _tool_queries(body, max_queries)
        if err:
            return Action("invalid", error=err, span=span)
        return Action("search", queries=queries, span=span)

    for kind in (call, "answer"):
        if re.search(tag_pattern(kind, False), clean, re.I):
            return Action("invalid", error=f"unclosed <{kind}> tag")
    if stray:
        return Action("invalid", error=f"</{stray}> without an opening <{stray}>")
    return Action("invalid", error=f"no <{call}> or <answer> action")
