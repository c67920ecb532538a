"""Contract: our agent executor, driven by OpenRLHF 0.11.2's own multi-turn executor code and turned into an
``Experience`` by OpenRLHF's own ``SamplesGenerator`` code, with a scripted fake vLLM engine (needs the OpenRLHF
venv: ``scripts/test_openrlhf.sh``)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("openrlhf")
pytest.importorskip("vllm")
pytestmark = pytest.mark.openrlhf


@pytest.fixture(scope="module")
def kb_index_tokenizer(tmp_path_factory):
    from openrlhf_search.data.formats import write_corpus_jsonl
    from openrlhf_search.data.synthetic import generate_kb
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.retrieval.bm25 import BM25Config, index_corpus_bm25

    root = tmp_path_factory.mktemp("agent_contract")
    kb = generate_kb(seed=1, n_entities=16)
    corpus = write_corpus_jsonl(kb.corpus, root / "corpus.jsonl")
    index_corpus_bm25(corpus, root / "index", BM25Config(), show_progress=False)
    tok = build_tiny_tokenizer([d.contents for d in kb.corpus] * 3, vocab_size=600)
    return kb, root / "index", tok


class FakeEngine:
    """Stands in for OpenRLHF's ``RolloutRayActor``: replays scripted turns, records the sampling params."""

    def __init__(self, tokenizer, turns):
        self.tok = tokenizer
        self.turns = list(turns)  # (text, finish_reason, stop_reason)
        self.calls = []

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.calls.append((list(prompt_token_ids), sampling_params))
        text, finish, stop = self.turns.pop(0)
        ids = self.tok.encode(text, add_special_tokens=False)
        if finish == "stop" and stop is None:  # vLLM keeps the EOS id in the output when it stops there
            ids = ids + [self.tok.eos_token_id]
        if finish == "length":
            ids = ids[: sampling_params.max_tokens]
            text = self.tok.decode(ids)
        logprobs = [{i: SimpleNamespace(logprob=-0.25)} for i in ids]
        out = SimpleNamespace(token_ids=ids, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop)
        return SimpleNamespace(outputs=[out])


def _run(kb_index_tokenizer, monkeypatch, turns, *, max_length=600, cap=64, max_turns=3, calib=True):
    from vllm import SamplingParams

    from openrlhf_search.integrations.openrlhf import agent
    from openrlhf_search.integrations.openrlhf.config import AGENT_CONFIG_ENV

    kb, index, tok = kb_index_tokenizer
    env = {"topk": 2, "max_turns": max_turns, "max_tokens_per_turn": cap, "max_obs_tokens": 80, "reward": "format_em"}
    cfg = {"retrieval_url": str(index), "env": env, "calib_records": calib}
    monkeypatch.setenv(AGENT_CONFIG_ENV, json.dumps(cfg))
    agent.get_runtime.cache_clear()
    sample = kb.train[0]
    label = json.dumps({"question": sample.question, "golden_answers": sample.golden_answers})
    prompt = f"Question: {sample.question}\n"
    params = SamplingParams(temperature=1.0, max_tokens=None, min_tokens=1, skip_special_tokens=False, logprobs=None)
    engine = FakeEngine(tok, [(t.format(answer=sample.golden_answers[0]), f, s) for t, f, s in turns])
    executor = agent.AgentExecutor()
    result = asyncio.run(executor.execute(prompt, label, params, max_length, tok, engine))
    return result, engine, sample, tok


SEARCH_THEN_ANSWER = [
    ("<think>look it up</think><search>who founded the company</search>", "stop", "</search>"),
    ("<answer>{answer}</answer>", "stop", "</answer>"),
]


def test_executor_is_openrlhf_s_multi_turn_executor():
    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
    from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

    from openrlhf_search.integrations.openrlhf import agent
    from openrlhf_search.integrations.openrlhf.flags import AGENT_FILE

    executor = _load_agent_executor(str(AGENT_FILE))  # exactly how every vLLM actor loads it
    assert isinstance(executor, MultiTurnAgentExecutor)
    assert issubclass(agent.SearchAgentInstance, AgentInstanceBase)


def test_stop_strings_cap_and_logprobs_on_every_turn(kb_index_tokenizer, monkeypatch):
    result, engine, _, _ = _run(kb_index_tokenizer, monkeypatch, SEARCH_THEN_ANSWER, max_length=600, cap=64)
    assert len(engine.calls) == 2
    for prompt_ids, params in engine.calls:
        assert {"</search>", "</answer>"} <= set(params.stop)
        assert params.include_stop_str_in_output is True
        assert params.logprobs == 1
        assert params.max_tokens == min(64, 600 - len(prompt_ids))
    assert result["rollout_log_probs"] is not None


def test_experience_masks_retrieved_tokens_and_scores_the_answer(kb_index_tokenizer, monkeypatch):
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    from openrlhf_search.integrations.openrlhf import agent, calib_store

    result, engine, sample, tok = _run(kb_index_tokenizer, monkeypatch, SEARCH_THEN_ANSWER)
    exp = SamplesGenerator._process_response_into_experience(None, result, max_len=600)
    seq, mask = exp.sequences[0].tolist(), exp.action_mask[0].tolist()
    (s1, e1), (s2, e2) = result["action_ranges"]
    assert all(mask[p - 1] == 1 for p in list(range(s1, e1)) + list(range(s2, e2)))
    assert all(m == 0 for m in mask[e1 - 1 : s2 - 1])  # the observation: tokenized once, masked
    observation = tok.decode(seq[e1:s2])
    assert "<information>" in observation and "</information>" in observation and "Doc 1" in observation
    assert tok.decode(seq[s2:e2]).startswith("<answer>")
    assert exp.rewards.item() == pytest.approx(1.0) and exp.truncated.item() is False
    info = {k: v.item() for k, v in exp.info.items()}
    assert info["search/num_searches"] == 1 and info["search/answered"] == 1 and info["search/em"] == 1
    assert set(agent.metric_names()) <= set(info)
    record = calib_store.collect([int(info["calib_id"])])[0]
    assert record["answer_span"] == [s2 - 1, e2 - 1] or record["answer_span"] == (s2 - 1, e2 - 1)
    turn = record["search_turns"][0]
    assert (turn["start"], turn["end"]) == (s1 - 1, e1 - 1) and len(turn["doc_ids"]) >= 1


def test_budget_exhaustion_is_truncation(kb_index_tokenizer, monkeypatch):
    long_turn = ("<think>" + "very long thinking " * 80 + "</think>", "length", None)
    result, engine, _, _ = _run(kb_index_tokenizer, monkeypatch, [long_turn] * 3, max_length=160, cap=64,
                                max_turns=5, calib=False)  # fmt: skip
    assert result["truncated"] is True
    assert result["extra_logs"]["search/truncated"] == 1.0 and "calib_id" not in result["extra_logs"]
    assert result["reward"] == 0.0
    assert len(result["observation_tokens"]) <= 160 + 80  # the last feedback may overflow; OpenRLHF truncates


def test_eos_without_action_ends_the_episode(kb_index_tokenizer, monkeypatch):
    result, engine, _, _ = _run(kb_index_tokenizer, monkeypatch, [("I do not know.", "stop", None)], calib=False)
    assert len(engine.calls) == 1
    assert result["truncated"] is False and result["extra_logs"]["search/num_invalid"] == 1.0


def test_last_turn_cannot_search(kb_index_tokenizer, monkeypatch):
    turns = [("<search>who founded the company</search>", "stop", "</search>")] * 2
    result, engine, _, _ = _run(kb_index_tokenizer, monkeypatch, turns, max_turns=2, calib=False)
    assert len(engine.calls) == 2
    assert result["extra_logs"]["search/num_docs"] > 0
    assert result["truncated"] is False and result["extra_logs"]["search/answered"] == 0.0
