"""Property tests (hypothesis): parsing never crashes, neutralization is complete, trajectories stay consistent."""

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from openrlhf_search.env import EnvConfig, SearchEnv
from openrlhf_search.env.actions import ANY_TAG_RE, parse_action
from openrlhf_search.env.observation import neutralize
from openrlhf_search.rewards import exact_match, extract_answer, f1_score, normalize_answer, substring_exact_match

FRAGMENTS = [
    "<search>", "</search>", "<answer>", "</answer>", "<think>", "</think>", "<information>", "</information>",
    "<tool_call>", "</tool_call>", "<|im_end|>", "<|im_start|>", "< /ANSWER >", "<", ">", "/", "|", "\n", ";",
    " ", "Paris", "query", '["a", "b"]', "{", "}",
]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=25).map("".join)


@given(texts)
def test_parse_action_total(text):
    for protocol in ("tags", "tool_call"):
        act = parse_action(text, protocol)
        assert act.kind in ("search", "answer", "invalid")
        if act.kind == "search":
            assert act.queries and all(q.strip() for q in act.queries) and act.error is None
        elif act.kind == "answer":
            assert act.answer and act.error is None
        else:
            assert act.error


@given(st.one_of(texts, st.text(max_size=60)))
@example("<|>")  # found by hypothesis: the overlapping "<|>" is no chat marker
def test_neutralize_leaves_no_tag(text):
    out = neutralize(text, ["<|endoftext|>", "</s>"])
    assert not ANY_TAG_RE.search(out)
    # no chat marker can remain: a "<|" followed later by a separate "|>" (the overlapping "<|>" is no marker)
    assert "<|" not in out or "|>" not in out[out.index("<|") + 2 :]
    assert neutralize(out, ["<|endoftext|>", "</s>"]) == out
    assert extract_answer("<information>" + out + "</information>") is None


@given(st.text(max_size=30), st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_metric_order(pred, golds):
    em, f1 = exact_match(pred, golds), f1_score(pred, golds)
    assert 0.0 <= f1 <= 1.0 and em in (0.0, 1.0)
    if em:
        assert f1 == 1.0
        if normalize_answer(pred):  # a non-empty exact match is also a substring match
            assert substring_exact_match(pred, golds) == 1.0
    assert normalize_answer(normalize_answer(pred)) == normalize_answer(pred)


TURNS = st.sampled_from([
    "<think>hmm</think><search>{s}</search>",
    "<search>{s}\nother words</search>",
    "no action at all",
    "<answer>x</answer>",
    "<search></search>",
    "<think>x",
    "<information>fake <answer>y</answer></information>",
    "<search>{s}</search><|im_end|>",
    "blah<|im_end|>",
])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(TURNS, min_size=1, max_size=6), st.integers(1, 4), st.booleans())
def test_trajectory_invariants(tok, kb, retriever, script, max_turns, forbid):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_turns=max_turns, forbid_search_on_last_turn=forbid))
    s = kb.train[0]
    (t,) = env.reset([s])
    history = []
    for turn in script:
        if t.done:
            break
        ids = tok.encode(turn.format(s=s.metadata["subject"]), add_special_tokens=False)
        history.append(list(t.response_ids))

        class G:
            token_ids, logprobs = ids, [-1.0] * len(ids)

        env.step([t], [G()])
    for prefix in history:  # earlier ids never change
        assert t.response_ids[: len(prefix)] == prefix
    assert len(t.response_ids) == len(t.action_mask) == len(t.logprobs)
    assert sum(t.action_mask) == sum(r.model_span[1] - r.model_span[0] for r in t.turns)
    assert tok.decode(t.prompt_ids + t.response_ids) == t.meta["prompt_text"] + t.response_text
    assert len(t.turns) <= max_turns and len(t.prompt_ids) + len(t.response_ids) <= env.cfg.max_total_tokens
    if t.done:
        assert t.finish_reason in ("answer", "max_turns", "max_length", "stop")
        assert (t.answer is not None) == (t.finish_reason == "answer")
