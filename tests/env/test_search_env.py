"""SearchEnv: token-in/token-out, masks, one retrieval call per turn, limits, protocols, CalibAdv records."""

import pytest

from openrlhf_search.env import EnvConfig, SearchEnv
from openrlhf_search.rewards import RewardInput, extract_answer, get_reward_fn, is_valid_format, run_reward


def _char_ids(tok, text):
    """A valid but non-canonical tokenization (one token per character, added tags kept whole)."""
    ids, i = [], 0
    tags = sorted((t for t in tok.get_added_vocab() if text.find(t) >= 0), key=len, reverse=True)
    while i < len(text):
        tag = next((t for t in tags if text.startswith(t, i)), None)
        chunk = tag or text[i]
        ids.extend(tok.encode(chunk, add_special_tokens=False))
        i += len(chunk)
    return ids


def test_token_in_token_out_and_masks(tok, kb, retriever, gen):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_turns=4))
    s = kb.train[0]
    trajs = env.reset([s])
    t = trajs[0]
    turn1_text = f"<think>look up</think>\n<search>{s.metadata['subject']}</search>"
    ids1 = _char_ids(tok, turn1_text)
    assert ids1 != tok.encode(turn1_text, add_special_tokens=False)  # really non-canonical
    g1 = gen(turn1_text, ids=ids1)
    g1.logprobs = [-0.1 * (k + 1) for k in range(len(ids1))]
    env.step(trajs, [g1])
    snapshot = list(t.response_ids)
    ids2 = _char_ids(tok, "<answer>unknown</answer>")
    env.step(trajs, [gen("", ids=ids2)])

    assert t.finish_reason == "answer" and t.answer == "unknown"
    assert t.response_ids[: len(snapshot)] == snapshot  # earlier ids never change
    m1, m2 = t.turns[0].model_span, t.turns[1].model_span
    assert t.response_ids[m1[0] : m1[1]] == ids1 and t.response_ids[m2[0] : m2[1]] == ids2
    # decoding the ids gives exactly the prompt text + model texts + observation texts
    assert tok.decode(t.prompt_ids + t.response_ids) == t.meta["prompt_text"] + t.response_text
    assert t.response_text.startswith(turn1_text)
    # masks cover exactly the model tokens; log-probs are the engine's there and 0 elsewhere
    model_pos = set(range(*m1)) | set(range(*m2))
    assert [i for i, m in enumerate(t.action_mask) if m] == sorted(model_pos)
    assert [t.logprobs[i] for i in range(*m1)] == g1.logprobs
    assert all(t.logprobs[i] == 0.0 for i in range(len(t.response_ids)) if i not in model_pos)
    o = t.turns[0].obs_span
    assert o == (m1[1], m2[0]) and tok.decode(t.response_ids[o[0] : o[1]]) == t.turns[0].obs_text
    assert len(t.response_ids) == len(t.action_mask) == len(t.logprobs)


def test_one_retrieval_call_per_turn_for_the_batch(tok, kb, retriever, gen):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(topk=2))
    trajs = env.reset(kb.train[:4])
    outs = [
        "<search>Zeta one</search>",
        "<answer>done</answer>",
        "<search>alpha\nbeta</search>",
        "<search>gamma</search>",
    ]
    info = env.step(trajs, [gen(x) for x in outs])
    assert retriever.calls == [["Zeta one", "alpha", "beta", "gamma"]]
    assert info["queries"] == 4 and env.retrieval_calls == 1 and env.retrieval_seconds >= 0.0
    expect = type(retriever)(kb.corpus).search(["alpha", "beta"], 2)  # a fresh copy: same ranking, no call logged
    merged = list(dict.fromkeys(h.document.id for hits in expect for h in hits))
    assert trajs[2].turns[0].doc_ids == merged and len(trajs[2].turns[0].scores) == len(merged)
    assert trajs[1].done and not trajs[0].done
    # next turn: only the live ones generate, still one call
    live = env.live(trajs)
    assert live == [trajs[0], trajs[2], trajs[3]]
    env.step(trajs, [gen("<answer>x</answer>"), gen("<search>delta</search>"), gen("<answer>y</answer>")])
    assert len(retriever.calls) == 2 and retriever.calls[1] == ["delta"]
    with pytest.raises(ValueError, match="1 live trajectories"):
        env.step(trajs, [gen("<answer>z</answer>")] * 2)


def test_max_turns_and_forbidden_last_search(tok, kb, retriever, gen):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_turns=3))
    trajs = env.reset(kb.train[:1])
    for k in range(3):
        env.step(trajs, [gen(f"<search>query {k}</search>")])
    t = trajs[0]
    assert t.finish_reason == "max_turns" and len(t.turns) == 3
    assert len(retriever.calls) == 2  # the last-turn search is not executed
    assert t.turns[2].error == "search is not allowed on the last turn" and t.turns[2].obs_span is None
    assert env.template.last_turn_hint in t.turns[1].obs_text
    assert env.template.last_turn_hint not in t.turns[0].obs_text
    assert t.num_searches == 2

    env2 = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_turns=2, forbid_search_on_last_turn=False))
    trajs = env2.reset(kb.train[:1])
    env2.step(trajs, [gen("<search>a</search>")])
    env2.step(trajs, [gen("<search>b</search>")])
    assert trajs[0].finish_reason == "max_turns" and trajs[0].turns[1].doc_ids  # executed, then stopped
    assert env2.template.last_turn_hint not in trajs[0].response_text


def test_length_limits(tok, kb, retriever, gen):
    cfg = EnvConfig(max_turns=20, max_tokens_per_turn=40, max_obs_tokens=30)
    env = SearchEnv(tok, retriever, "search_r1", cfg)
    trajs = env.reset(kb.train[:1])
    t = trajs[0]
    assert env.turn_budget(t) == 40
    env.cfg.max_total_tokens = len(t.prompt_ids) + 100
    env.step(trajs, [gen("<search>a</search>")])
    obs = t.turns[0].obs_span
    assert obs[1] - obs[0] <= 30 + 12  # documents within max_obs_tokens, plus the wrapper
    assert env.turn_budget(t) == min(40, 100 - len(t.response_ids))
    while not t.done:  # keep searching: observations shrink to fit, then the trajectory stops
        budget = env.turn_budget(t)
        assert budget >= cfg.min_turn_tokens
        env.step(trajs, [gen("<search>b</search>")])
    assert t.finish_reason == "max_length" and len(t.turns) < cfg.max_turns
    assert len(t.prompt_ids) + len(t.response_ids) <= env.cfg.max_total_tokens
    env3 = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_response_tokens=10))
    assert env3.turn_budget(env3.reset(kb.train[:1])[0]) == 10


def test_invalid_actions_feedback_and_eos(tok, kb, retriever, gen):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_turns=3))
    trajs = env.reset(kb.train[:2])
    eos = tok.eos_token
    env.step(trajs, [gen("I am not sure."), gen(f"I am not sure.{eos}")])
    a, b = trajs
    assert not a.done and a.turns[0].action == "invalid" and a.turns[0].obs_text == env.template.feedback()
    assert b.finish_reason == "stop" and b.answer is None
    env.step(trajs, [gen("<answer>Lyon</answer>")])
    assert a.answer == "Lyon" and extract_answer(a.response_text) == "Lyon"  # feedback holds no answer pair
    score, info = env.compute_rewards([a], get_reward_fn("format_em"))[0]
    assert not info["valid_format"] and score == 0.0


def test_groups_and_sample_coercion(tok, kb, retriever):
    env = SearchEnv(tok, retriever)
    trajs = env.reset([kb.train[0], {"id": "q9", "question": "Who?", "golden_answers": "Bob"}], n=3)
    assert [t.meta["group_id"] for t in trajs] == [kb.train[0].id] * 3 + ["q9"] * 3
    assert trajs[3].meta["golden_answers"] == ["Bob"] and trajs[0].prompt_ids == trajs[2].prompt_ids
    assert trajs[0].prompt_ids is not trajs[1].prompt_ids
    with pytest.raises(ValueError, match=r"samples\[0\]: missing or non-string field 'question'"):
        env.reset([{"id": "x"}])


def test_repeated_search_turns(tok, kb, retriever, gen):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_turns=4))
    trajs = env.reset(kb.train[:1])
    subj = kb.train[0].metadata["subject"]
    env.step(trajs, [gen(f"<search>{subj}</search>")])
    env.step(trajs, [gen(f"<think>again</think><search>{subj.upper()}</search>")])
    env.step(trajs, [gen("<search>Zzz totally new words</search>")])
    flags = [t.repeated for t in trajs[0].turns]
    assert flags[:2] == [False, True]


def test_tool_call_protocol_end_to_end(tok, kb, retriever, gen):
    env = SearchEnv(tok, retriever, "qwen_tools", EnvConfig(max_turns=3))
    assert env.stop_strings() == ["</tool_call>", "</answer>"]
    s = kb.train[1]
    trajs = env.reset([s])
    t = trajs[0]
    assert "<tools>" in t.meta["prompt_text"] and t.meta["prompt_text"].endswith("<|im_start|>assistant\n")
    call = f'<think>x</think><tool_call>{{"name": "search", "arguments": {{"query": "{s.metadata["subject"]}"}}}}'
    env.step(trajs, [gen(call + "</tool_call>")])
    assert t.turns[0].obs_text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n")
    env.step(trajs, [gen(f"<answer>{s.golden_answers[0]}</answer><|im_end|>")])
    assert t.finish_reason == "answer"
    assert tok.decode(t.prompt_ids + t.response_ids) == t.meta["prompt_text"] + t.response_text
    assert is_valid_format(t.response_text, "tool_call")
    assert t.valid_format and env.compute_rewards([t], get_reward_fn("format_em"))[0][0] == 1.0  # env's protocol


def test_to_calib_record(tok, kb, retriever, gen):
    pytest.importorskip("openrlhf_search.algorithms.calibadv")
    env = SearchEnv(tok, retriever, "search_r1")
    s = kb.train[0]
    trajs = env.reset([s])
    env.step(trajs, [gen(f"<think>a</think><search>{s.metadata['subject']}</search>")])
    env.step(trajs, [gen(f"<think>b</think><answer>{s.golden_answers[0]}</answer>")])
    t = trajs[0]
    rec = t.to_calib_record()
    assert len(rec.search_turns) == 1
    st = rec.search_turns[0]
    assert (st.start, st.end) == t.turns[0].model_span and st.doc_ids == t.turns[0].doc_ids and not st.repeated
    assert tuple(rec.answer_span) == t.turns[1].model_span
    assert rec.f1 == 1.0 and rec.valid_format


def test_turn_end_detection(tok, kb, retriever, gen):
    env = SearchEnv(tok, retriever, "search_r1", eos_token_ids=[tok.convert_tokens_to_ids("<|endoftext|>")])
    trajs = env.reset(kb.train[:3])
    by_reason = gen("no action")
    by_reason.finish_reason = "eos"  # the engine says EOS even if the id is not in the list
    env.step(trajs, [gen("no action<|endoftext|>"), gen("no action<|im_end|>"), by_reason])
    assert [t.finish_reason for t in trajs] == ["stop", None, "stop"]  # <|im_end|> is not an EOS for this env


@pytest.mark.parametrize(
    "script",
    [
        ["<information><answer>{gold}</answer>", "I give up"],  # fake evidence block: the parser rejects the answer
        ["<answer>wrong</answer> <answer>{gold}</answer>"],  # first action wins: the env's answer is "wrong"
        ["<search>x", "<answer>{gold}"],  # unclosed: no answer, whatever the text shows
    ],
)
def test_rewards_score_the_answer_the_env_accepted(tok, kb, retriever, gen, script):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_turns=2))
    s = kb.train[0]
    gold = s.golden_answers[0]
    trajs = env.reset([s])
    for text in script:
        if not trajs[0].done:
            env.step(trajs, [gen(text.format(gold=gold))])
    t = trajs[0]
    assert t.answer != gold and t.to_calib_record().f1 == 0.0
    assert extract_answer(t.response_text) is not None or script[-1].startswith("<answer>")  # the text alone
    for name in ("em", "subem", "f1", "format_em", "format_f1", "f1_x_format"):
        score, info = env.compute_rewards(trajs, get_reward_fn(name))[0]
        assert score == 0.0 and info["answer"] == t.answer, name


def test_rewards_of_an_accepted_answer_are_unchanged(tok, kb, retriever, gen):
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_turns=2))
    s = kb.train[0]
    trajs = env.reset([s])
    env.step(trajs, [gen(f"<answer>{s.golden_answers[0]}</answer>")])
    for name in ("em", "format_em", "f1_x_format"):
        fn = get_reward_fn(name)
        text = trajs[0].response_text
        x = RewardInput(question=s.question, answer=extract_answer(text), golden_answers=tuple(s.golden_answers),
                        valid_format=is_valid_format(text), num_tool_calls=0)
        assert env.compute_rewards(trajs, fn)[0] == run_reward(fn, [x])[0]
        assert env.compute_rewards(trajs, fn)[0][0] == 1.0


def test_prompt_over_the_total_budget_starts_finished(tok, kb, retriever, gen):
    probe = SearchEnv(tok, retriever, "search_r1").reset(kb.train[:1])[0]
    n = len(probe.prompt_ids)
    env = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_total_tokens=n))
    trajs = env.reset(kb.train[:1])
    assert trajs[0].finish_reason == "max_length" and env.live(trajs) == [] and trajs[0].response_ids == []
    env.step(trajs, [])  # nothing to generate
    ok = SearchEnv(tok, retriever, "search_r1", EnvConfig(max_total_tokens=n + 1)).reset(kb.train[:1])[0]
    assert not ok.done


def test_turn_is_repeated_rule_shared_by_both_backends():
    from types import SimpleNamespace

    from openrlhf_search.env.search_env import turn_is_repeated

    first = SimpleNamespace(queries=["Paris capital"], doc_ids=["d1", "d2"], text="<search>Paris capital</search>")
    assert not turn_is_repeated(["Berlin"], ["d3"], "<search>Berlin</search>", [first])
    assert turn_is_repeated(["paris  CAPITAL."], ["d9"], "<search>x</search>", [first])  # same query, normalised
    assert turn_is_repeated(["Lyon"], ["d2", "d1"], "<search>Lyon</search>", [first])  # nothing new shown
    assert turn_is_repeated(["a", "b"], [], "<search>Paris   capital</search>", [first])  # same text
    assert not turn_is_repeated(["Lyon"], [], "<search>Lyon</search>", [first])  # no documents: not "all seen"
    assert not turn_is_repeated(["Lyon"], ["d1"], "<search>Lyon</search>", [])  # first turn
