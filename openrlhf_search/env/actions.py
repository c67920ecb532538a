"""Parse one model turn into an action: a tool call (``search``, ``open``...), an answer, or invalid.

Models do not write clean tags. The rules, in the order they are applied (each is covered by a table test):

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
5. **The tool parses its own arguments** (:meth:`~openrlhf_search.env.tools.Tool.parse_tag` for the body of
   ``<name>...</name>``, :meth:`~openrlhf_search.env.tools.Tool.parse_arguments` for a tool call's JSON
   ``arguments``). ``search``: a JSON list of strings (``<search>["a", "b"]</search>``) or queries separated by
   newlines or ``;``, stripped, unquoted, deduplicated case-insensitively, at most ``max_queries_per_turn``; in a
   tool call ``"query"`` is a string (one query, never split) or a list (also under ``"queries"``).
6. **Nothing complete** -> invalid, with an error saying what was missing (an unclosed tool tag or ``<answer>``,
   a stray closing tag, or no action at all).

Which tags are actions follows from the environment's tools (``EnvConfig.tools``): with ``["search"]`` an
``<open>`` tag is plain text; with ``["search", "open"]`` it is a call. The environment answers invalid actions with
the template's fixed corrective observation.

Tag matching ignores case and whitespace inside the brackets (``< /Search >``), like the neutralizer in
:mod:`openrlhf_search.env.observation`, so anything the parser would accept is also neutralized in retrieved text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

from openrlhf_search.env.protocol import ANY_TAG_RE, OBSERVATION_TAGS, PROTOCOL_TAG_NAMES, any_tag_re, tag_pattern
from openrlhf_search.env.tools import SearchTool, Tool
from openrlhf_search.env.tools import split_queries as _split_queries

__all__ = ["Action", "parse_action", "split_queries", "PROTOCOL_TAG_NAMES", "ANY_TAG_RE"]

PROTOCOLS = tuple(OBSERVATION_TAGS)


@dataclass(frozen=True)
class Action:
    """The parsed action of one model turn."""

    kind: str
    """A tool name (``search``, ``open``...), ``answer`` or ``invalid``."""
    queries: list[str] = field(default_factory=list)
    """Search queries (``search`` only), deduplicated, in the order written."""
    answer: str | None = None
    """The stripped answer text (``answer`` only)."""
    error: str | None = None
    """Why the action is invalid (``invalid`` only)."""
    span: tuple[int, int] | None = None
    """Character span of the action (opening tag to end of closing tag) in the parsed text."""
    args: dict = field(default_factory=dict)
    """The tool's parsed arguments (tool calls only; ``search``: ``{"queries": [...]}``)."""


def split_queries(body: str, max_queries: int = 4) -> list[str]:
    """Queries of a ``<search>`` body (see :func:`openrlhf_search.env.tools.search.split_queries`)."""
    return _split_queries(body, max_queries)


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


def _tool_call(body: str, tools: dict) -> tuple[str | None, dict, str | None]:
    """``(tool name, args, error)`` of a ``<tool_call>`` JSON body."""
    s = body.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, re.S)
    if fence:
        s = fence.group(1)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as exc:
        return None, {}, f"tool call is not valid JSON ({exc.msg} at char {exc.pos})"
    if not isinstance(obj, dict):
        return None, {}, "tool call JSON must be an object with 'name' and 'arguments'"
    name = obj.get("name")
    if name not in tools:
        return None, {}, f"unknown tool {name!r} (available: {', '.join(repr(t) for t in tools)})"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = {"query": args}
    if not isinstance(args, dict):
        return None, {}, "tool call 'arguments' must be an object"
    parsed, err = tools[name].parse_arguments(args)
    return name, parsed, err


def _default_tools(max_queries: int) -> list[Tool]:
    return [SearchTool(SimpleNamespace(topk=3, max_queries_per_turn=max_queries, max_docs_per_turn=None))]


def parse_action(text: str, protocol: str = "tags", max_queries: int = 4, tools: Sequence | None = None) -> Action:
    """Parse one model turn (see the module docstring for the rules).

    Args:
        text: the decoded model tokens of this turn only (not the prompt, not earlier turns).
        protocol: ``tags`` (``<search>``, ``<open>``...) or ``tool_call`` (``<tool_call>`` JSON).
        max_queries: at most this many queries are kept from one search (only when ``tools`` is not given).
        tools: the environment's :class:`~openrlhf_search.env.tools.Tool` instances (default: ``search`` alone).
    """
    if protocol not in PROTOCOLS:
        raise KeyError(f"unknown protocol {protocol!r}; valid: {sorted(PROTOCOLS)}")
    by_name = {t.name: t for t in (tools if tools is not None else _default_tools(max_queries))}
    calls = list(by_name) if protocol == "tags" else ["tool_call"]
    nested_re = any_tag_re(tuple(dict.fromkeys(PROTOCOL_TAG_NAMES + tuple(by_name))))
    clean = text or ""
    for obs in ("information", "tool_response"):
        clean = _blank_blocks(clean, obs)
    clean = _blank_blocks(clean, "think")

    # The first complete action: the earliest closing tag that has an opening tag of its kind before it.
    closes = sorted(
        (m.start(), m.end(), kind)
        for kind in (*calls, "answer")
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
        nested = nested_re.search(body)
        if nested:
            return Action("invalid", error=f"tag {nested.group(0)!r} nested inside <{kind}>", span=span)
        if kind == "answer":
            ans = body.strip()
            if not ans:
                return Action("invalid", error="empty answer", span=span)
            return Action("answer", answer=ans, span=span)
        if protocol == "tags":
            name = kind
            args, err = by_name[kind].parse_tag(body)
        else:
            name, args, err = _tool_call(body, by_name)
        if err:
            return Action("invalid", error=err, span=span)
        return Action(name, queries=list(args.get("queries", [])) if name == "search" else [], span=span, args=args)

    for kind in (*calls, "answer"):
        if re.search(tag_pattern(kind, False), clean, re.I):
            return Action("invalid", error=f"unclosed <{kind}> tag")
    if stray:
        return Action("invalid", error=f"</{stray}> without an opening <{stray}>")
    return Action("invalid", error=f"no {'/'.join(f'<{c}>' for c in calls)} or <answer> action")
