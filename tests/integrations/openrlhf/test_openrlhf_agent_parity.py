"""Parity through OpenRLHF's own executor: the scenarios of ``agent_parity_scripts`` run through OpenRLHF 0.11.2's
``MultiTurnAgentExecutor`` (our ``AgentExecutor``, loaded the way every vLLM actor loads it) and through the local
``SearchEnv`` give identical token ids, action masks, log-probs, rewards, finish reasons, metrics and CalibAdv records
(opt-in suite: ``scripts/test_openrlhf.sh -k parity``)."""

from __future__ import annotations

import asyncio

import pytest
from agent_parity_scripts import SCENARIOS, VLLMScriptedEngine, agent_config, compare, fill, run_local

pytest.importorskip("openrlhf")
pytest.importorskip("vllm")
pytestmark = pytest.mark.openrlhf


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from types import SimpleNamespace

    from openrlhf_search.data.formats import write_corpus_jsonl
    from openrlhf_search.data.synthetic import generate_kb
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.env.templates import QWEN_TOOLS_SYSTEM, SEARCH_R1_USER
    from openrlhf_search.retrieval import load_retriever
    from openrlhf_search.retrieval.bm25 import BM25Config, index_corpus_bm25

    root = tmp_path_factory.mktemp("parity_openrlhf")
    kb = generate_kb(seed=1, n_entities=16)
    corpus = write_corpus_jsonl(kb.corpus, root / "corpus.jsonl")
    index_corpus_bm25(corpus, root / "index", BM25Config(), show_progress=False)
    tok = build_tiny_tokenizer(([d.contents for d in kb.corpus] + [SEARCH_R1_USER, QWEN_TOOLS_SYSTEM]) * 3, 700)
    sample = kb.train[0]
    doc_id = next(d.id for d in kb.corpus if d.title == sample.metadata["subject"])
    return SimpleNamespace(index=root / "index", tok=tok, retriever=load_retriever(str(root / "index")),
                           sample=sample, doc_id=doc_id)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_openrlhf_executor_parity(scenario, world, monkeypatch):
    import json

    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
    from vllm import SamplingParams

    from openrlhf_search.integrations.openrlhf import agent_core, calib_store
    from openrlhf_search.integrations.openrlhf.config import AGENT_CONFIG_ENV
    from openrlhf_search.integrations.openrlhf.flags import AGENT_FILE

    env, traj, max_length = run_local(scenario, world.tok, world.retriever, world.sample, world.doc_id)
    monkeypatch.setenv(AGENT_CONFIG_ENV, agent_config(scenario, world.index))
    agent_core.get_runtime.cache_clear()
    runtime = agent_core.get_runtime()
    seen = {}
    real_finalize = agent_core.finalize

    async def spy(result, state, rt=None):  # keep the agent's trajectory for the comparison
        seen["traj"] = state.traj
        return await real_finalize(result, state, rt)

    monkeypatch.setattr(agent_core, "finalize", spy)
    s = world.sample
    prompt = runtime.episode(world.tok, max_length).template.render(s.question, world.tok)
    label = json.dumps({"question": s.question, "golden_answers": list(s.golden_answers)})
    engine = VLLMScriptedEngine(world.tok, [(fill(t, s, world.doc_id), m) for t, m in scenario.turns])
    params = SamplingParams(temperature=1.0, max_tokens=None, min_tokens=1, skip_special_tokens=False, logprobs=None)
    executor = _load_agent_executor(str(AGENT_FILE))
    result = asyncio.run(executor.execute(prompt, label, params, max_length, world.tok, engine))
    record = calib_store.collect([int(result["extra_logs"]["calib_id"])])[0]
    compare(env, traj, result, seen["traj"], runtime.reward_fn, record)
