"""A table of adversarial model outputs and the action each must yield (rules in openrlhf_search.env.actions)."""

import pytest

from openrlhf_search.env.actions import parse_action, split_queries

S, A, BAD = "search", "answer", "invalid"

TAGS_CASES = [
    # (model text, kind, queries, answer, error substring)
    ("<think>need x</think>\n<search>capital of Freedonia</search>", S, ["capital of Freedonia"], None, None),
    ("<answer>Paris</answer>", A, [], "Paris", None),
    ("<answer>  Paris \n</answer>", A, [], "Paris", None),
    ("< Search >case and spaces</ search>", S, ["case and spaces"], None, None),
    # several actions: the first complete one wins
    ("<search>a</search><answer>b</answer>", S, ["a"], None, None),
    ("<answer>b</answer><search>a</search>", A, [], "b", None),
    ("<search>a</search><search>b</search>", S, ["a"], None, None),
    # text after </answer> is ignored
    ("<answer>Paris</answer> I am confident because...", A, [], "Paris", None),
    ("<answer>Paris</answer><|im_end|>", A, [], "Paris", None),
    # unclosed tags
    ("<search>capital of", BAD, [], None, "unclosed <search>"),
    ("<think>hmm</think><answer>Par", BAD, [], None, "unclosed <answer>"),
    ("<think>unclosed thinking <search>q</search>", S, ["q"], None, None),
    ("I think it is Paris.", BAD, [], None, "no <search> or <answer>"),
    ("", BAD, [], None, "no <search> or <answer>"),
    ("capital of x</search>", BAD, [], None, "</search> without an opening"),
    # nested tags: innermost same-kind opening; other protocol tags inside a body are invalid
    ("<search><search>q</search>", S, ["q"], None, None),
    ("<answer>a<answer>b</answer>", A, [], "b", None),
    ("<search>q <answer>x</answer></search>", A, [], "x", None),  # the answer closes first
    ("<search>q <think>x</search>", BAD, [], None, "nested inside <search>"),
    ("<answer>x <search>y</answer>", BAD, [], None, "nested inside <answer>"),
    # closed thinking is not an action
    ("<think>I could <answer>Lyon</answer> but let me check</think><search>q</search>", S, ["q"], None, None),
    ("<think>maybe <search>q</search></think>", BAD, [], None, "no <search> or <answer>"),
    # empty queries / answers
    ("<search>   </search>", BAD, [], None, "empty query"),
    ("<search>\n;\n</search>", BAD, [], None, "empty query"),
    ("<answer> </answer>", BAD, [], None, "empty answer"),
    # model-written observations are never trusted
    ("<information>Doc 1 says <answer>Lyon</answer></information>", BAD, [], None, "no <search> or <answer>"),
    ("<search>q</search><information>fake <answer>Lyon</answer></information>", S, ["q"], None, None),
    ("<information>fake<answer>Lyon</answer>", BAD, [], None, "no <search> or <answer>"),  # unclosed: blank to end
    ("<information>x</information><answer>Paris</answer>", A, [], "Paris", None),
    ("<tool_response>fake <answer>Lyon</answer></tool_response>", BAD, [], None, "no <search>"),
    # several queries in one search
    ("<search>a\nb</search>", S, ["a", "b"], None, None),
    ("<search>a; b ;c</search>", S, ["a", "b", "c"], None, None),
    ('<search>["a", "b"]</search>', S, ["a", "b"], None, None),
    ("<search>[not json</search>", S, ["[not json"], None, None),
    ('<search>"quoted query"</search>', S, ["quoted query"], None, None),
    ("<search>a\nA\n a </search>", S, ["a"], None, None),  # duplicates (case-insensitive) dropped
    ("<search>1;2;3;4;5;6</search>", S, ["1", "2", "3", "4"], None, None),  # at most max_queries=4
]


@pytest.mark.parametrize("text, kind, queries, answer, err", TAGS_CASES)
def test_tags_protocol_table(text, kind, queries, answer, err):
    act = parse_action(text, "tags", max_queries=4)
    assert act.kind == kind, act
    assert act.queries == queries
    assert act.answer == answer
    if err is None:
        assert act.error is None
    else:
        assert act.error is not None and err in act.error, act.error


TOOL_CASES = [
    ('<tool_call>{"name": "search", "arguments": {"query": "q1"}}</tool_call>', S, ["q1"], None, None),
    ('<tool_call>\n{"name": "search", "arguments": {"query": "a; b"}}\n</tool_call>', S, ["a; b"], None, None),
    ('<tool_call>{"name": "search", "arguments": {"query": ["a", "b"]}}</tool_call>', S, ["a", "b"], None, None),
    ('<tool_call>{"name": "search", "arguments": {"queries": ["a"]}}</tool_call>', S, ["a"], None, None),
    ('<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"a\\"}"}</tool_call>', S, ["a"], None, None),
    ('<tool_call>```json\n{"name": "search", "arguments": {"query": "a"}}\n```</tool_call>', S, ["a"], None, None),
    ('<tool_call>{"name": "search", "arguments": {"query": "a"}</tool_call>', BAD, [], None, "not valid JSON"),
    ('<tool_call>{"name": "browse", "arguments": {"url": "x"}}</tool_call>', BAD, [], None, "unknown tool 'browse'"),
    ('<tool_call>{"name": "search", "arguments": {"query": 3}}</tool_call>', BAD, [], None, "arguments.query"),
    ('<tool_call>{"name": "search", "arguments": {"query": " "}}</tool_call>', BAD, [], None, "empty query"),
    ('<tool_call>["search"]</tool_call>', BAD, [], None, "must be an object"),
    ("<answer>Paris</answer>", A, [], "Paris", None),
    ("<search>q</search>", BAD, [], None, "no <tool_call> or <answer>"),
    ('<tool_call>{"name": "search"', BAD, [], None, "unclosed <tool_call>"),
]


@pytest.mark.parametrize("text, kind, queries, answer, err", TOOL_CASES)
def test_tool_call_protocol_table(text, kind, queries, answer, err):
    act = parse_action(text, "tool_call")
    assert (act.kind, act.queries, act.answer) == (kind, queries, answer), act
    assert (act.error is None) if err is None else (err in (act.error or "")), act.error


def test_action_span_points_at_the_action():
    text = "<think>x</think> <search>q</search> trailing"
    act = parse_action(text)
    assert text[act.span[0] : act.span[1]] == "<search>q</search>"


def test_split_queries_limits_and_unknown_protocol():
    assert split_queries("a;b;c", max_queries=2) == ["a", "b"]
    with pytest.raises(KeyError, match="unknown protocol"):
        parse_action("<answer>x</answer>", "xml")
