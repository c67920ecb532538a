"""Parity: the same scripted model outputs through the local ``SearchEnv`` and through our OpenRLHF agent instance
give identical token ids, action masks, log-probs, rewards, finish reasons, metrics and CalibAdv records.

Main suite, no OpenRLHF needed: the agent runs through ``agent_core`` (everything ``agent.py`` subclasses) inside a
scripted executor that follows OpenRLHF 0.11.2's ``MultiTurnAgentExecutor`` loop (tokenize the prompt and each
feedback text with ``tokenizer(text=..., add_special_tokens=False)``, ``max_tokens = max_length - context``, stop on
``done``). ``test_openrlhf_agent_parity.py`` runs the same scenarios through OpenRLHF's own executor (opt-in suite).
"""

from __future__ import annotations

import asyncio
import json
from copy import deepcopy
from types import SimpleNamespace

import pytest
from agent_parity_scripts import SCENARIOS, VLLMScriptedEngine, agent_config, compare, fill, run_local


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from openrlhf_search.data.formats import write_corpus_jsonl
    from openrlhf_search.data.synthetic import generate_kb
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.env.templates import QWEN_TOOLS_SYSTEM, SEARCH_R1_USER
    from openrlhf_search.retrieval import load_retriever
    from openrlhf_search.retrieval.bm25 import BM25Config, index_corpus_bm25

    root = tmp_path_factory.mktemp("parity")
    kb = generate_kb(seed=1, n_entities=16)
    corpus = write_corpus_jsonl(kb.corpus, root / "corpus.jsonl")
    index_corpus_bm25(corpus, root / "index", BM25Config(), show_progress=False)
    texts = [d.contents for d in kb.corpus] + [SEARCH_R1_USER, QWEN_TOOLS_SYSTEM]
    tok = build_tiny_tokenizer(texts * 3, vocab_size=700)
    sample = kb.train[0]
    doc_id = next(d.id for d in kb.corpus if d.title == sample.metadata["subject"])
    return SimpleNamespace(kb=kb, index=root / "index", tok=tok, retriever=load_retriever(str(root / "index")),
                           sample=sample, doc_id=doc_id)


class ScriptedMultiTurnExecutor:
    """OpenRLHF 0.11.2's multi-turn loop, as far as the agent can observe it (written for this test)."""

    def __init__(self, instance_cls):
        self.instance_cls = instance_cls
        self.state = None

    async def execute(self, prompt, label, sampling_params, max_length, tok, engine, images=None):
        from openrlhf_search.integrations.openrlhf import agent_core

        self.state = agent_core._STATE.get()
        inst = self.instance_cls()
        obs = (await inst.reset({"observation": prompt, "label": label}))["observation"]
        tokens = tok(text=obs, add_special_tokens=False)["input_ids"]
        ranges, logprobs = [], [0.0] * len(tokens)
        while True:
            sampling_params.max_tokens = max_length - len(tokens)
            if sampling_params.max_tokens <= 0:
                break
            out = (await engine.generate(tokens, deepcopy(sampling_params))).outputs[0]
            ranges.append((len(tokens), len(tokens) + len(out.token_ids)))
            step = await inst.step({"observation_text": obs, "action_text": out.text, "label": label,
                                    "sampling_params": sampling_params})
            feedback = tok(text=step["environment_feedback"], add_special_tokens=False)["input_ids"]
            obs += out.text + step["environment_feedback"]
            tokens = tokens + list(out.token_ids) + feedback
            logprobs += [d[t].logprob for t, d in zip(out.token_ids, out.logprobs)] + [0.0] * len(feedback)
            if step["done"]:
                break
        return {"observation_tokens": tokens, "action_ranges": ranges, "rollout_log_probs": logprobs,
                "reward": 0.0, "scores": 0.0, "truncated": False, "extra_logs": {}}


def run_agent(scenario, world, max_length, monkeypatch):
    from openrlhf_search.integrations.openrlhf import agent_core, calib_store
    from openrlhf_search.integrations.openrlhf.config import AGENT_CONFIG_ENV

    monkeypatch.setenv(AGENT_CONFIG_ENV, agent_config(scenario, world.index))
    agent_core.get_runtime.cache_clear()
    runtime = agent_core.get_runtime()
    s = world.sample
    prompt = runtime.episode(world.tok, max_length).template.render(s.question, world.tok)
    label = json.dumps({"question": s.question, "golden_answers": list(s.golden_answers)})
    engine = VLLMScriptedEngine(world.tok, [(fill(t, s, world.doc_id), m) for t, m in scenario.turns])
    executor = ScriptedMultiTurnExecutor(agent_core.SearchAgentLogic)
    params = SimpleNamespace(stop=None, include_stop_str_in_output=False, logprobs=None, max_tokens=None)
    result = asyncio.run(agent_core.run_episode(executor.execute, prompt, label, params, max_length, world.tok,
                                                engine))
    record = calib_store.collect([int(result["extra_logs"]["calib_id"])])[0]
    return result, executor.state.traj, record, runtime, engine


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_local_env_and_agent_instance_parity(scenario, world, monkeypatch):
    env, traj, max_length = run_local(scenario, world.tok, world.retriever, world.sample, world.doc_id)
    assert traj.finish_reason == scenario.expect_finish, [(t.action, t.error) for t in traj.turns]
    result, agent_traj, record, runtime, engine = run_agent(scenario, world, max_length, monkeypatch)
    compare(env, traj, result, agent_traj, runtime.reward_fn, record)
    for _, params in engine.calls:  # our stop strings and log-probs on every turn, the per-turn cap
        assert set(env.stop_strings()) <= set(params.stop) and params.include_stop_str_in_output
        assert params.logprobs == 1 and params.max_tokens <= env.cfg.max_tokens_per_turn


def test_parity_scenarios_exercise_what_they_claim(world):
    """The scenarios reach the rules they are named after (so the parity above covers them)."""
    by_name = {s.name: s for s in SCENARIOS}

    def run(name):
        return run_local(by_name[name], world.tok, world.retriever, world.sample, world.doc_id)[1]

    t = run("open_then_answer")
    assert t.turns[0].action == "open" and t.turns[0].doc_ids == [world.doc_id] and "[page 1 of" in t.turns[0].obs_text
    t = run("open_missing_and_past_the_end")
    assert "has only" in t.turns[0].obs_text and "No document matches" in t.turns[1].obs_text
    t = run("over_long_turn")
    assert t.turns[0].gen_finish_reason == "length" and t.turns[0].action == "invalid"
    t = run("search_on_the_last_turn")
    assert t.turns[2].error == "search is not allowed on the last turn" and t.turns[2].obs_span is None
    t = run("injected_tags")
    assert t.answer == "wrong" and t.turns[0].action == "invalid"
    t = run("open_not_a_tool")
    assert t.turns[0].action == "invalid" and "<open>" not in t.meta["prompt_text"]
    t = run("tool_call_protocol")
    assert [x.action for x in t.turns] == ["open", "search", "answer"] and t.turns[0].doc_ids == [world.doc_id]
    t = run("qwen3_tools_chat_rendered")  # the tool result is the chat template's own `tool` message delta
    assert [x.action for x in t.turns] == ["search", "open", "invalid"]
    assert t.turns[0].obs_text.startswith("<|im_end|>\n<|im_start|>tool\n")  # stopped at </tool_call>: close the turn
    assert t.turns[1].obs_text.startswith("\n<|im_start|>tool\n")  # the model wrote <|im_end|> itself
    assert t.turns[1].obs_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    t = run("qwen3_think_tags")
    assert [x.action for x in t.turns] == ["search", "answer"] and "<information>" in t.turns[0].obs_text
    t = run("answer_on_the_last_turn")
    assert len(t.turns) == 3 and t.answer == world.sample.golden_answers[0]


def test_agent_module_imports_without_openrlhf():
    import importlib.util

    from openrlhf_search.integrations.openrlhf import agent_core

    assert agent_core.SearchAgentLogic and callable(agent_core.run_episode)
    if importlib.util.find_spec("openrlhf") is None:
        with pytest.raises(ImportError):
            import openrlhf_search.integrations.openrlhf.agent  # noqa: F401  (only the OpenRLHF subclassing)


def test_parity_agent_viewer_records_equal_the_local_trainers(world, monkeypatch, tmp_path):
    """With ``rollout_dir`` set, the agent writes the same viewer record as the local trainer would for the same
    trajectory (one builder, ``viewer.records.trajectory_record``): ``openrlhf-search view`` reads both."""
    import os

    from openrlhf_search.viewer.records import read_records, trajectory_record

    scenario = next(s for s in SCENARIOS if s.name == "search_then_answer")
    base = globals()["agent_config"]
    monkeypatch.setitem(globals(), "agent_config", lambda sc, idx: json.dumps(
        {**json.loads(base(sc, idx)), "rollout_dir": str(tmp_path), "rollout_every": 1}))
    env, traj, max_length = run_local(scenario, world.tok, world.retriever, world.sample, world.doc_id)
    result, agent_traj, _, runtime, _ = run_agent(scenario, world, max_length, monkeypatch)
    (written,) = read_records(tmp_path / f"agent_{os.getpid()}.jsonl")
    from openrlhf_search.env.episode import score_trajectory

    score, info = score_trajectory(traj, runtime.reward_fn)
    local = trajectory_record(traj, world.tok, reward=score, reward_info=info)
    for key in ("tokens", "mask", "turns", "answer", "finish_reason", "reward", "question", "golden_answers"):
        assert written[key] == json.loads(json.dumps(local[key])), key


def test_agent_fails_over_between_retrieval_replicas_and_logs_it(world, monkeypatch):
    """The agent's retriever over two replicas, the first one dead: the trajectory equals the local one (nothing
    lost) and its ``extra_logs`` carry the failover of its own search (``retrieval/failover``)."""
    import socket

    from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig

    scenario = next(s for s in SCENARIOS if s.name == "search_then_answer")
    env, traj, max_length = run_local(scenario, world.tok, world.retriever, world.sample, world.doc_id)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    base = globals()["agent_config"]
    with RetrievalServer(world.retriever, ServerConfig(port=0)) as srv:
        monkeypatch.setitem(globals(), "agent_config", lambda sc, idx: json.dumps(
            {**json.loads(base(sc, idx)), "retrieval_url": f"{dead},{srv.url}"}))
        result, agent_traj, record, runtime, _ = run_agent(scenario, world, max_length, monkeypatch)
    assert runtime.retriever.urls == [dead, srv.url]
    logs = result["extra_logs"]
    assert logs.pop("retrieval/failover") == 1.0 and logs.pop("retrieval/replica_errors") == 1.0
    compare(env, traj, result, agent_traj, runtime.reward_fn, record)
    assert runtime.retriever.replica_stats()["failovers"] == 1
    _clear_runtime()


def _clear_runtime():
    from openrlhf_search.integrations.openrlhf import agent_core

    agent_core.get_runtime.cache_clear()
