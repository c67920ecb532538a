"""Search-R1 / verl client behaviour against our server, large and empty batches, malformed bodies, ties, token.

The two client functions below re-implement, from reading them, how Search-R1's
``search_r1/llm_agent/generation.py`` (``batch_search`` -> ``_batch_search``) and verl's
``verl/tools/utils/search_r1_like_utils.py`` (``call_search_api``) talk to a retrieval server: the fields they send,
the status handling and the fields they read. They are not copies of that code.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from openrlhf_search.retrieval import HTTPRetriever, load_retriever
from openrlhf_search.retrieval.client import TOKEN_ENV
from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig
from openrlhf_search.retrieval.types import Document


def search_r1_batch_search(url: str, queries: list[str], topk: int) -> list[str]:
    """Search-R1: POST {"queries", "topk", "return_scores": True}; no status check; reads body["result"] (a
    KeyError on any other body) and each hit's ["document"]["contents"] split into title / text."""
    body = httpx.post(f"{url}/retrieve", json={"queries": queries, "topk": topk, "return_scores": True},
                      timeout=60).json()
    out = []
    for hits in body["result"]:
        text = ""
        for i, hit in enumerate(hits):
            contents = hit["document"]["contents"]
            title, _, rest = contents.partition("\n")
            text += f"Doc {i + 1}(Title: {title}) {rest}\n"
        out.append(text)
    return out


def verl_call_search_api(url: str, query: str, topk: int = 3, return_scores: bool = True, retries: int = 3):
    """verl: one query per POST as {"queries": [q], "topk", "return_scores"} with JSON content/accept headers;
    retries 500/502/503/504; any other non-2xx is an error string; returns (json, error)."""
    payload = {"queries": [query], "topk": topk, "return_scores": return_scores}
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    error = None
    for _ in range(retries):
        response = httpx.post(f"{url}/retrieve", json=payload, headers=headers, timeout=30)
        if response.status_code in (500, 502, 503, 504):
            error = f"server error {response.status_code}"
            continue
        if response.status_code >= 400:
            return None, f"HTTP {response.status_code}"
        return response.json(), None
    return None, error


@pytest.fixture(scope="module")
def default_server(bm25_retriever):
    with RetrievalServer(bm25_retriever, ServerConfig(port=0)) as srv:  # default limits, as shipped
        yield srv


def test_search_r1_client_ordinary_empty_and_large_batches(default_server, bm25_retriever, known_queries):
    url = default_server.url
    queries = list(known_queries)
    got = search_r1_batch_search(url, queries, 3)
    expected = [search_r1_batch_search_in_process(bm25_retriever, q) for q in queries]
    assert got == expected
    # a step in which no sample searches: Search-R1 posts {"queries": []} and reads body["result"]
    assert search_r1_batch_search(url, [], 3) == []
    # Search-R1's GRPO recipe: 512 prompts x 5 samples = 2,560 queries in one POST, within the default limits
    big = [queries[i % len(queries)] + f" {i}" for i in range(2560)]
    assert len(search_r1_batch_search(url, big, 3)) == 2560


def search_r1_batch_search_in_process(retriever, query: str) -> str:
    text = ""
    for i, hit in enumerate(retriever.search([query], 3)[0]):
        title, _, rest = hit.document.contents.partition("\n")
        text += f"Doc {i + 1}(Title: {title}) {rest}\n"
    return text


def test_verl_client_scores_and_topk_above_corpus(default_server, bm25_retriever):
    body, error = verl_call_search_api(default_server.url, "capital of France", topk=3)
    assert error is None and body["result"][0][0]["document"]["id"] == "paris" and "score" in body["result"][0][0]
    plain, _ = verl_call_search_api(default_server.url, "capital of France", topk=2, return_scores=False)
    assert set(plain["result"][0][0]) == {"id", "contents"}
    # topk above the corpus size (48 passages, topk 100): the hits there are, no error
    many, error = verl_call_search_api(default_server.url, "capital city river", topk=100)
    assert error is None and 0 < len(many["result"][0]) <= len(bm25_retriever)
    # a bad request is a 4xx that verl does not retry
    _, error = verl_call_search_api(default_server.url, "x", topk=-1)
    assert error == "HTTP 422"


@pytest.mark.parametrize("depth", [1100, 100_000])
def test_deeply_nested_body_is_a_4xx_json_never_a_5xx(default_server, depth):
    body = b'{"queries": ' + b"[" * depth + b"]" * depth + b"}"
    before = httpx.get(f"{default_server.url}/metrics").json()["server_errors"]
    response = httpx.post(f"{default_server.url}/retrieve", content=body)
    assert 400 <= response.status_code < 500, response.text
    assert "nested too deeply" in response.json()["detail"] or "queries" in response.json()["detail"]
    nested = httpx.post(f"{default_server.url}/retrieve", content=b'{"queries": [[[["a"]]]]}')
    assert nested.status_code == 422 and "queries[0] must be a string" in nested.json()["detail"]
    assert httpx.get(f"{default_server.url}/metrics").json()["server_errors"] == before


def test_client_splits_a_batch_to_the_advertised_limits_in_order(bm25_retriever, known_queries):
    queries = [q + f" {i}" for i in range(5) for q in known_queries]  # 40 queries
    cfg = ServerConfig(port=0, max_queries_per_request=7, max_body_bytes=600)
    with RetrievalServer(bm25_retriever, cfg) as srv, HTTPRetriever(srv.url) as client:
        too_big = httpx.post(f"{srv.url}/retrieve", json={"queries": queries[:8]})
        assert too_big.status_code == 413  # the server does enforce its limit ...
        assert client.search(queries, 2) == bm25_retriever.search(queries, 2)  # ... and the client splits to it
        metrics = httpx.get(f"{srv.url}/metrics").json()
        assert metrics["client_errors"] == 1 and metrics["requests"] >= 7 and metrics["queries"] == 40
        import asyncio

        assert asyncio.run(client.asearch(queries, 2)) == bm25_retriever.search(queries, 2)
        client._limits = {"max_queries_per_request": 1000}  # stale (a server restarted with lower limits): one 413,
        assert client.search(queries, 2) == bm25_retriever.search(queries, 2)  # then re-read and re-split
        with pytest.raises(Exception, match="HTTP 413"):  # limits given explicitly are not second-guessed
            HTTPRetriever(srv.url, max_queries_per_request=8).search(queries, 2)
    assert client.chunks([]) == []


# ---------------------------------------------------------------------------------------------- determinism
@pytest.fixture(scope="module")
def identical_retriever(tmp_path_factory):
    from openrlhf_search.retrieval.bm25 import BM25Index, BM25Retriever

    docs = [Document(f"same-{i}", '"Same"\nthe same passage about tied scores') for i in range(40)]
    docs += [Document(f"other-{i}", f'"Other"\nunrelated words {i}') for i in range(10)]
    out = tmp_path_factory.mktemp("identical") / "bm25"
    BM25Index.build(docs, out)
    return BM25Retriever.from_dir(out)


def test_ties_are_broken_by_document_row_for_every_topk_and_batch(identical_retriever):
    expected = [f"same-{i}" for i in range(40)]
    for k in (1, 2, 3, 5, 8, 13, 40, 100):
        for batch in (["tied passage"], ["unrelated words 3", "tied passage", "nothing matches zzz"]):
            hits = identical_retriever.search(batch, k)[batch.index("tied passage")]
            assert [h.document.id for h in hits] == expected[: min(k, 40)]


def test_ties_identical_over_http_under_concurrent_mixed_topk(identical_retriever):
    expected = [f"same-{i}" for i in range(40)]
    rng = random.Random(0)
    requests = [(rng.choice([["tied passage"], ["unrelated words 1", "tied passage"]]), rng.randint(1, 12))
                for _ in range(48)]
    with RetrievalServer(identical_retriever, ServerConfig(port=0, batch_wait_ms=20)) as srv:
        client = HTTPRetriever(srv.url, timeout=30, retries=0)
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda r: client.search(r[0], r[1]), requests))
        assert httpx.get(f"{srv.url}/metrics").json()["batch_queries"]["max"] > 2  # requests did share calls
    for (queries, k), result in zip(requests, results):
        assert [h.document.id for h in result[queries.index("tied passage")]] == expected[:k]


class _AdversarialTies:
    """An InProcessRetriever whose index keeps a RANDOM subset of the documents tied at the k-th score."""

    def __new__(cls, scores):
        from openrlhf_search.retrieval.inprocess import InProcessRetriever

        class Fake(InProcessRetriever):
            def __init__(self):
                self.docs = list(range(len(scores)))
                self.rng = np.random.default_rng(0)

            def score_rows(self, queries, topk):
                k = min(topk, len(scores))
                perm = self.rng.permutation(len(scores))
                order = perm[np.argsort(-scores[perm], kind="stable")][:k]
                return np.tile(order, (len(queries), 1)), np.tile(scores[order], (len(queries), 1))

        return Fake()


def test_stable_selection_against_an_index_that_breaks_ties_randomly():
    scores = np.array([1.0, 3.0, 2.0, 2.0, 3.0, 2.0, 0.5, 2.0, 2.0, 2.0], dtype=np.float32)
    fake = _AdversarialTies(scores)
    truth = sorted(range(len(scores)), key=lambda r: (-scores[r], r))
    for k in range(1, 12):
        for _ in range(5):
            rows, got = fake.search_rows(["q", "q"], k)
            assert rows.tolist() == [truth[:k]] * 2 and got[0].tolist() == scores[truth[:k]].tolist()


# ---------------------------------------------------------------------------------------------- token
def test_token_from_the_environment_and_config_for_client_load_retriever_and_trainer(bm25_retriever, monkeypatch,
                                                                                      tmp_path):
    from openrlhf_search.trainer.config import TrainConfig
    from openrlhf_search.trainer.local import build_retriever

    with RetrievalServer(bm25_retriever, ServerConfig(port=0, token="s3cret")) as srv:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        with pytest.raises(Exception, match="HTTP 401"):
            load_retriever(srv.url, retries=0).search(["paris"], 1)
        # config: the trainer's retriever.token
        cfg = TrainConfig()
        cfg.retriever.spec, cfg.retriever.token = srv.url, "s3cret"
        assert build_retriever(cfg, tmp_path, None).search(["paris"], 1)[0][0].document.id == "paris"
        # environment: our client, load_retriever (what eval and the OpenRLHF agent call) and the trainer
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        assert HTTPRetriever(srv.url).search(["paris"], 1)[0][0].document.id == "paris"
        assert load_retriever(srv.url).search(["paris"], 1)[0][0].document.id == "paris"
        cfg.retriever.token = None
        assert build_retriever(cfg, tmp_path, None).search(["paris"], 1)[0][0].document.id == "paris"
        # an explicit empty token overrides the environment
        with pytest.raises(Exception, match="HTTP 401"):
            HTTPRetriever(srv.url, token="", retries=0).search(["paris"], 1)
        denied = httpx.post(f"{srv.url}/retrieve", content=json.dumps({"queries": ["x"]}))
        assert denied.status_code == 401 and denied.headers["WWW-Authenticate"] == 'Bearer realm="openrlhf-search"'


def test_stable_topk_fast_path_equals_the_full_sort():
    """``stable_topk`` skips its sort when an index's top-k is already sorted with no tie between hits; on random
    inputs (sorted or not, with and without ties and no-hits) it equals sorting by (score desc, row asc)."""
    from openrlhf_search.retrieval.inprocess import stable_topk

    rng = np.random.default_rng(0)
    for trial in range(300):
        q, n = int(rng.integers(1, 5)), int(rng.integers(1, 8))
        scores = rng.choice([1.0, 2.0, 3.0] if trial % 2 else rng.random(50) + 1, size=(q, n)).astype(np.float32)
        rows = np.stack([rng.permutation(100)[:n] for _ in range(q)]).astype(np.int64)
        if trial % 3 == 0:  # an index's output: sorted by score, no-hits (-1, -inf) last
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
            cut = int(rng.integers(0, n + 1))
            scores[:, cut:], rows[:, cut:] = -np.inf, -1
        k = int(rng.integers(1, n + 1))
        got_rows, got_scores = stable_topk(rows, scores, k)
        for i in range(q):
            pairs = sorted(zip(scores[i].tolist(), rows[i].tolist()),
                           key=lambda p: (-p[0], p[1] if p[1] >= 0 else 1 << 62))[:k]
            assert got_rows[i].tolist() == [r for _, r in pairs] and got_scores[i].tolist() == [s for s, _ in pairs]
