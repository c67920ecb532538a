"""Retrieval replicas as Ray actors on a local Ray cluster (needs Ray: the OpenRLHF venv, scripts/test_openrlhf.sh).

What the entrypoint does (``replicas.start_from_env`` with the launcher's ``OPENRLHF_SEARCH_RETRIEVAL_REPLICAS``),
what the agent in a vLLM engine does (``agent_core.get_runtime`` finds the replicas through the directory actor),
then one replica actor is killed (``ray.kill``) while a stream of batches runs: every batch is answered exactly as
the in-process index answers it, and the failover is counted.
"""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.openrlhf

from openrlhf_search.integrations.openrlhf import agent_core  # noqa: E402
from openrlhf_search.integrations.openrlhf.config import AGENT_CONFIG_ENV, AgentConfig, to_json_file  # noqa: E402
from openrlhf_search.retrieval import load_retriever, replicas  # noqa: E402
from openrlhf_search.retrieval.bm25 import BM25Config, BM25Index  # noqa: E402
from openrlhf_search.retrieval.corpus import write_corpus_jsonl  # noqa: E402
from openrlhf_search.retrieval.types import Document  # noqa: E402

WORDS = "capital france germany mountain river planet tragedy language light energy city sea".split()


def _corpus(n: int = 60) -> list[Document]:
    import random

    rng = random.Random(0)
    return [Document(f"d{i}", f'"Doc {i}"\n' + " ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + f" tag{i}")
            for i in range(n)]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    write_corpus_jsonl(_corpus(), root / "corpus.jsonl")
    BM25Index.build(root / "corpus.jsonl", root / "index", config=BM25Config(), show_progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_replica_actors_fail_over_when_one_is_killed(index_dir, ray_cluster, tmp_path, monkeypatch):
    ray = ray_cluster
    spec = replicas.ReplicaSpec(index=str(index_dir), replicas=3, num_cpus=1, loader_kwargs={"n_threads": 1})
    monkeypatch.setenv(replicas.REPLICAS_ENV, spec.to_json())
    started = replicas.start_from_env()  # what the entrypoint runs after ray.init
    assert len(started.urls) == 3 and len(set(started.urls)) == 3

    # the agent of a vLLM engine: finds the replicas by the directory's name, spreads its searches over them
    agent_file = to_json_file(AgentConfig(retrieval_url="", retrieval_replicas=spec.name, request_timeout=10.0),
                              tmp_path / "agent.json")
    monkeypatch.setenv(AGENT_CONFIG_ENV, str(agent_file))
    agent_core.get_runtime.cache_clear()
    try:
        client = agent_core.get_runtime().retriever
    finally:
        agent_core.get_runtime.cache_clear()
    assert sorted(client.urls) == sorted(started.urls)
    client.config.retries = 0  # one round: only moving the batch to another replica can answer it

    reference = load_retriever(index_dir, n_threads=1)
    import random

    rng = random.Random(1)
    stream = [[" ".join(rng.choices(WORDS, k=3)) for _ in range(rng.randint(1, 5))] for _ in range(45)]
    expected = [[[(h.document.id, round(h.score, 5)) for h in hits] for hits in reference.search(b, 3)]
                for b in stream]
    answers: dict[int, list] = {}
    errors: list[BaseException] = []
    answered = threading.Semaphore(0)

    def worker(indices):
        try:
            for i in indices:
                hits = client.search(stream[i], 3)
                answers[i] = [[(h.document.id, round(h.score, 5)) for h in per_query] for per_query in hits]
                answered.release()
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(list(range(k, len(stream), 3)),)) for k in range(3)]
    for t in threads:
        t.start()
    for _ in range(10):
        assert answered.acquire(timeout=60)
    victim = started.urls.index(client.replicas[0].url)
    ray.kill(started.actors[victim])  # a replica dies mid-stream
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [answers[i] for i in range(len(stream))] == expected  # nothing lost, every batch exact
    stats = client.replica_stats()
    assert stats["failovers"] >= 1 and stats["marked_down"] == 1 and stats["replicas_up"] == 2
    assert not client.replicas[0].up

    # per_node: one replica pinned to each alive node (this cluster has one)
    node = replicas.start_replicas(replicas.ReplicaSpec(index=str(index_dir), replicas="per_node", num_cpus=0.5,
                                                        name="per_node_dir", loader_kwargs={"n_threads": 1}))
    assert len(node.urls) == 1 and node.nodes == [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert replicas.discover("per_node_dir") == node.urls
    node.stop()
    started.stop()
    client.close()


def test_a_replica_that_cannot_load_the_index_is_named(ray_cluster, tmp_path):
    with pytest.raises(RuntimeError, match=r"retrieval replica 0 \(spread\) failed to serve .*missing"):
        replicas.start_replicas(replicas.ReplicaSpec(index=str(tmp_path / "missing"), replicas=1, num_cpus=0.5,
                                                     name="broken_dir", start_timeout_s=60))
    with pytest.raises(RuntimeError, match="no retrieval replica directory named 'nobody'"):
        replicas.discover("nobody", timeout=1)
