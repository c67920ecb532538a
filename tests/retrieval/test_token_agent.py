"""The retrieval token reaches the OpenRLHF agent: forwarded to Ray workers, used by the agent's retriever
(needs the OpenRLHF venv)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openrlhf")
pytest.importorskip("vllm")
pytestmark = pytest.mark.openrlhf


def test_agent_runtime_authenticates_with_the_environment_token(bm25_retriever, monkeypatch):
    from openrlhf_search.integrations.openrlhf import agent, entrypoint
    from openrlhf_search.integrations.openrlhf.config import AGENT_CONFIG_ENV
    from openrlhf_search.retrieval.client import TOKEN_ENV
    from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig

    with RetrievalServer(bm25_retriever, ServerConfig(port=0, token="s3cret")) as srv:
        monkeypatch.setenv(AGENT_CONFIG_ENV, json.dumps({"retrieval_url": srv.url, "env": {"topk": 1}}))
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        assert entrypoint.runtime_env_vars()[TOKEN_ENV] == "s3cret"  # reaches Ray workers on every node
        agent.get_runtime.cache_clear()
        hits = agent.get_runtime().retriever.search(["capital of France"], 1)
        assert hits[0][0].document.id == "paris"
        monkeypatch.setenv(TOKEN_ENV, "wrong")
        agent.get_runtime.cache_clear()
        with pytest.raises(Exception, match="HTTP 401"):
            agent.get_runtime().retriever.search(["capital of France"], 1)
        agent.get_runtime.cache_clear()
