"""The tool protocol: the built-in ``open`` tool, batching of mixed tool calls, format rules and neutralization that
follow the tool list, and a user tool added the way docs/environment.md shows (one class, one registration)."""

from __future__ import annotations

import ast
import operator

import pytest

from openrlhf_search.env import TOOLS, EnvConfig, SearchEnv, Tool, parse_action
from openrlhf_search.env.observation import neutralize
from openrlhf_search.env.tools import Rendered, get_tools
from openrlhf_search.env.tools.open import paginate
from openrlhf_search.retrieval.types import Document
from openrlhf_search.rewards import format_error, is_valid_format


class DocRetriever:
    """The env fixture's word-overlap retriever plus ``get_documents`` (id, else title); counts calls."""

    def __init__(self, base, docs):
        self.base, self.docs, self.doc_calls = base, docs, []

    def search(self, queries, topk=3):
        return self.base.search(queries, topk)

    def get_documents(self, keys):
        self.doc_calls.append(list(keys))
        out = []
        for k in keys:
            out.append(next((d for d in self.docs if d.id == k or d.title.lower() == k.lower()), None))
        return out


@pytest.fixture
def docs_retriever(retriever, kb):
    return DocRetriever(retriever, kb.corpus)


def _tools(*names, **cfg):
    return get_tools(list(names), EnvConfig(tools=list(names), **cfg))


OPEN_CASES = [
    ("<open>Paris</open>", "open", {"target": "Paris", "page": 1}, None),
    ("<open> syn-city-3 | 2 </open>", "open", {"target": "syn-city-3", "page": 2}, None),
    ("<open>Paris | page 3</open>", "open", {"target": "Paris", "page": 3}, None),
    ("<open>  </open>", "invalid", {}, "needs a document id or title"),
    ("<open>Paris | 0</open>", "invalid", {}, "pages count from 1"),
    ("<think>x</think><open>a</open><search>b</search>", "open", {"target": "a", "page": 1}, None),
    ("<search>b</search><open>a</open>", "search", {"queries": ["b"]}, None),
    ("<open>a <search>b</search></open>", "search", {"queries": ["b"]}, None),  # the search closes first
    ("<open>a <answer>b</open>", "invalid", {}, "nested inside <open>"),
    ("<open>unclosed", "invalid", {}, "unclosed <open>"),
]


@pytest.mark.parametrize("text, kind, args, err", OPEN_CASES)
def test_open_tag_table(text, kind, args, err):
    act = parse_action(text, "tags", tools=_tools("search", "open"))
    assert act.kind == kind and act.args == args, act
    assert (act.error is None) if err is None else (err in (act.error or "")), act.error


def test_open_tool_call_and_unknown_tools():
    tools = _tools("search", "open")
    act = parse_action('<tool_call>{"name": "open", "arguments": {"id": "d1", "page": 2}}</tool_call>', "tool_call",
                       tools=tools)
    assert act.kind == "open" and act.args == {"target": "d1", "page": 2}
    act = parse_action('<tool_call>{"name": "open", "arguments": {"title": "Paris"}}</tool_call>', "tool_call",
                       tools=tools)
    assert act.args == {"target": "Paris", "page": 1}
    act = parse_action('<tool_call>{"name": "open", "arguments": {"id": "d"}}</tool_call>', "tool_call",
                       tools=_tools("search"))
    assert act.kind == "invalid" and "unknown tool 'open'" in act.error
    act = parse_action("<open>Paris</open>", "tags", tools=_tools("search"))  # not a tool here: no action
    assert act.kind == "invalid" and act.error == "no <search> or <answer> action"


def test_paginate_is_lossless_and_bounded(tok):
    text = " ".join(f"word{i}" for i in range(300))
    pages = paginate(text, tok, 40)
    assert "".join(pages) == text and len(pages) > 3
    assert all(len(tok.encode(p, add_special_tokens=False)) <= 40 for p in pages)
    assert paginate("", tok, 10) == [""]


def test_open_pages_through_the_environment(tok, kb, docs_retriever, gen):
    long_doc = Document("long-1", '"Long Article"\n' + " ".join(f"fact{i} is here." for i in range(120)))
    docs_retriever.docs = list(kb.corpus) + [long_doc]
    env = SearchEnv(tok, docs_retriever, "search_r1", EnvConfig(tools=["search", "open"], max_turns=5,
                                                                 max_obs_tokens=200, open_page_tokens=60))
    trajs = env.reset(kb.train[:1])
    env.step(trajs, [gen("<open>long article</open>")])
    env.step(trajs, [gen("<open>Long Article | 2</open>")])
    env.step(trajs, [gen("<open>Long Article | 99</open>")])
    t = trajs[0]
    first, second, past = (x.obs_text for x in t.turns)
    n = len(paginate(long_doc.text, tok, 60))
    assert f"[page 1 of {n}]" in first and "fact0 " in first and f"[page 2 of {n}]" in second
    assert "fact0 " not in second and f"has only {n} page(s)" in past and t.turns[2].doc_ids == []
    assert t.turns[0].doc_ids == ["long-1"] and t.num_tool_calls == 3 and t.num_searches == 0
    m = env.metrics(t, {})
    assert m["open/num_opens"] == 3 and m["open/num_not_found"] == 1 and m["search/num_searches"] == 0


def test_one_backend_call_per_tool_per_turn(tok, kb, docs_retriever, gen):
    env = SearchEnv(tok, docs_retriever, "search_r1", EnvConfig(tools=["search", "open"]))
    trajs = env.reset(kb.train[:4])
    subj = [s.metadata["subject"] for s in kb.train[:4]]
    env.step(trajs, [gen(f"<open>{subj[0]}</open>"), gen(f"<search>{subj[1]}</search>"),
                     gen(f"<open>{subj[2]}</open>"), gen("<answer>x</answer>")])
    assert docs_retriever.doc_calls == [[subj[0], subj[2]]] and docs_retriever.base.calls == [[subj[1]]]
    assert [t.turns[0].action for t in trajs] == ["open", "search", "open", "answer"]
    assert "<open>" in env.template.user and "</open>" in env.stop_strings()


def test_format_rules_and_neutralization_follow_the_tools():
    good = "<open>Paris</open><information>Doc</information><answer>x</answer>"
    assert is_valid_format(good) and is_valid_format(good, tools=["search", "open"])
    assert "text outside blocks" in format_error(good, tools=["search"])
    assert neutralize("</information><open>x</open>") == "[/information][open]x[/open]"


def test_last_turn_tool_call_is_not_executed(tok, kb, docs_retriever, gen):
    env = SearchEnv(tok, docs_retriever, "search_r1", EnvConfig(tools=["search", "open"], max_turns=1))
    trajs = env.reset(kb.train[:1])
    env.step(trajs, [gen("<open>x</open>")])
    assert trajs[0].turns[0].error == "open is not allowed on the last turn" and docs_retriever.doc_calls == []


# ------------------------------------------------------------------ the worked example of docs/environment.md
def _safe_eval(expr: str) -> float:
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.USub: operator.neg}

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.operand))
        raise ValueError("only + - * / on numbers")

    return ev(ast.parse(expr, mode="eval").body)


class Calculator(Tool):
    name = "calc"
    description = "Evaluate an arithmetic expression."
    parameters = {"type": "object", "properties": {"expr": {"type": "string"}}, "required": ["expr"]}
    instruction = "To compute, write an expression inside <calc></calc>."

    def parse_tag(self, body):
        return ({"expr": body.strip()}, None) if body.strip() else ({}, "empty expression")

    def parse_arguments(self, args):
        return self.parse_tag(str(args.get("expr", "")))

    def execute(self, calls, retriever):  # no backend: every call of the turn computed here
        out = []
        for c in calls:
            try:
                out.append(str(_safe_eval(c["expr"])))
            except (ValueError, SyntaxError, ZeroDivisionError) as exc:
                out.append(f"error: {exc}")
        return out

    def render(self, args, result, ctx):
        return Rendered(f"{args['expr']} = {result}")


@pytest.fixture
def calc_registered():
    TOOLS.add("calc", Calculator)
    yield
    TOOLS._items.pop("calc")


def test_a_user_tool_in_one_class_and_one_registration(tok, kb, retriever, gen, calc_registered):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(tools=["search", "calc"], max_turns=3))
    trajs = env.reset(kb.train[:2])
    env.step(trajs, [gen("<calc>2 + 3 * 4</calc>"), gen("<calc>1 / 0</calc>")])
    assert trajs[0].turns[0].obs_text.startswith("\n\n<information>2 + 3 * 4 = 14")
    assert "error: division by zero" in trajs[1].turns[0].obs_text
    env.step(trajs, [gen("<answer>14</answer>"), gen("<answer>no</answer>")])
    assert is_valid_format(trajs[0].response_text) and env.metrics(trajs[0], {})["calc/calls"] == 1.0
    assert "<calc>" in env.template.user and "</calc>" in env.stop_strings()
    with pytest.raises(KeyError, match="already registered"):
        TOOLS.add("calc", Calculator)
