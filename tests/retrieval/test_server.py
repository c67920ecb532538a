"""The HTTP server on loopback: Search-R1 protocol, every bad input -> 4xx JSON, auth, micro-batching, load test."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from openrlhf_search.retrieval import HTTPRetriever, load_retriever
from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig
from openrlhf_search.retrieval.types import Hit


class RecordingRetriever:
    """Wraps a retriever; records the size of every batch; optional delay; raises on the query 'BOOM'."""

    def __init__(self, inner, delay: float = 0.0):
        self.inner, self.delay, self.batches = inner, delay, []

    def __len__(self):
        return len(self.inner)

    def search(self, queries, topk=3):
        self.batches.append(len(queries))
        if "BOOM" in queries:
            raise RuntimeError("index exploded")
        time.sleep(self.delay)
        return self.inner.search(queries, topk)


@pytest.fixture(scope="module")
def server(bm25_retriever):
    cfg = ServerConfig(port=0, max_queries_per_request=300, max_query_chars=200, max_topk=50, max_body_bytes=20_000)
    with RetrievalServer(bm25_retriever, cfg, info={"method": "bm25"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_protocol_matches_in_process(http, bm25_retriever, known_queries):
    queries = list(known_queries)
    body = http.post("/retrieve", json={"queries": queries, "topk": 3, "return_scores": True}).json()
    assert set(body) == {"result"} and len(body["result"]) == len(queries)
    got = [[Hit.from_json(h) for h in hits] for hits in body["result"]]
    assert got == bm25_retriever.search(queries, 3)
    first = body["result"][0][0]
    assert set(first) == {"document", "score"} and set(first["document"]) == {"id", "contents"}
    # Search-R1: without return_scores each hit is the bare document; topk defaults to 3
    plain = http.post("/retrieve", json={"queries": queries[:1]}).json()["result"][0]
    assert plain == [h.document.to_json() for h in bm25_retriever.search(queries[:1], 3)[0]]


def test_health_and_metrics(http, bm25_retriever):
    health = http.get("/health").json()
    from openrlhf_search.retrieval.cache import index_fingerprint

    assert health == {"status": "ok", "documents": len(bm25_retriever), "method": "bm25",
                      "fingerprint": index_fingerprint(bm25_retriever),
                      "limits": {"max_queries_per_request": 300, "max_topk": 50, "max_query_chars": 200,
                                 "max_body_bytes": 20_000, "read_timeout_s": 30.0, "max_connections": 768}}
    http.post("/retrieve", json={"queries": ["paris"], "topk": 1})
    metrics = http.get("/metrics").json()
    assert metrics["requests"] >= 1 and metrics["queries"] >= 1 and metrics["batches"] >= 1
    assert metrics["latency_ms"]["p99"] >= metrics["latency_ms"]["p50"] > 0
    assert "token" not in metrics["config"]


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b'{"queries": ["caf\xe9"]}', 400, "not valid UTF-8"),
    (b"[1, 2]", 422, "must be a JSON object"),
    (b"{}", 422, "'queries' is required"),
    (b'{"queries": 5}', 422, "'queries' must be a list of strings or one string"),
    (b'{"queries": ["ok", 5]}', 422, "queries[1] must be a string"),
    (b'{"queries": [null]}', 422, "queries[0] must be a string"),
    (b'{"queries": ["\\ud800"]}', 422, "unpaired surrogate"),
    (b'{"queries": ["a"], "topk": -3}', 422, "'topk' must be positive"),
    (b'{"queries": ["a"], "topk": 51}', 422, "'topk' is 51; this server's cap is max_topk=50"),
    (b'{"queries": ["a"], "top_k": 1000000}', 422, "'top_k' is 1000000; this server's cap is max_topk=50"),
    (b'{"queries": ["a"], "topk": 3, "top_k": 4}', 422, "disagree"),
    (b'{"queries": ["a"], "query": "b"}', 422, "not both"),
    (b'{"queries": ["a"], "topk": "3"}', 422, "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": 2.5}', 422, "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": true}', 422, "'topk' must be an integer"),
    (b'{"queries": ["a"], "return_scores": "yes"}', 422, "'return_scores' must be a boolean"),
    (json.dumps({"queries": ["q"] * 301}).encode(), 413, "too many queries"),
    (json.dumps({"queries": ["x"], "pad": "y" * 30_000}).encode(), 413, "exceeds max_body_bytes"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_input_gets_4xx_json(http, body, status, message):
    response = http.post("/retrieve", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_oversize_chunked_body_without_content_length(http):
    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    response = http.post("/retrieve", content=chunks())
    assert response.status_code == 413 and "exceeds max_body_bytes" in response.json()["detail"]


def test_wrong_route_and_method_are_json(http):
    assert http.get("/retrieve").status_code == 405
    missing = http.get("/nope")
    assert missing.status_code == 404 and "detail" in missing.json()


def test_server_survives_bad_input_and_failing_retrieval(bm25_retriever):
    flaky = RecordingRetriever(bm25_retriever)
    with RetrievalServer(flaky, ServerConfig(port=0)) as srv, httpx.Client(base_url=srv.url) as http:
        failed = http.post("/retrieve", json={"queries": ["BOOM"]})
        assert failed.status_code == 500 and "index exploded" in failed.json()["detail"]
        for body, _, _ in BAD_REQUESTS[:6]:
            assert 400 <= http.post("/retrieve", content=body).status_code < 500
        ok = http.post("/retrieve", json={"queries": ["paris"], "topk": 1})
        assert ok.status_code == 200 and ok.json()["result"][0][0]["id"] == "paris"
        assert http.get("/metrics").json()["server_errors"] == 1


def test_bearer_token(bm25_retriever):
    with RetrievalServer(bm25_retriever, ServerConfig(port=0, token="s3cret")) as srv:
        body = {"queries": ["paris"], "topk": 1}
        assert httpx.post(f"{srv.url}/retrieve", json=body).status_code == 401
        wrong = httpx.post(f"{srv.url}/retrieve", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "bearer token" in wrong.json()["detail"]
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(f"{srv.url}/metrics").status_code == 401
        assert httpx.get(f"{srv.url}/health").status_code == 200  # liveness stays open
        hits = HTTPRetriever(srv.url, token="s3cret").search(["paris"], 1)
        assert hits[0][0].document.id == "paris"


def test_concurrent_requests_are_micro_batched_with_their_own_topk(bm25_retriever, known_queries):
    slow = RecordingRetriever(bm25_retriever, delay=0.05)
    queries = list(known_queries)
    cfg = ServerConfig(port=0, batch_wait_ms=20)
    with RetrievalServer(slow, cfg) as srv, ThreadPoolExecutor(8) as pool:
        client = HTTPRetriever(srv.url, timeout=20)
        futures = [pool.submit(client.search, [q], 1 + i % 3) for i, q in enumerate(queries)]
        results = [f.result() for f in futures]
    for i, (q, res) in enumerate(zip(queries, results)):
        assert res == bm25_retriever.search([q], 1 + i % 3)  # each request keeps its own topk prefix
    assert sum(slow.batches) == len(queries)
    assert len(slow.batches) < len(queries) and max(slow.batches) > 1  # fewer retrieval calls than requests


def test_load_16_clients_zero_errors_identical_results(server, bm25_retriever, known_queries):
    """16 concurrent clients x 6 requests each on loopback, bounded by a 60 s deadline."""
    words = " ".join(known_queries).split()
    requests = [[" ".join(words[(c * 7 + r * 3 + j) % len(words)] for j in range(4)) for j in range(1 + r % 3)]
                for c in range(16) for r in range(6)]
    expected = [bm25_retriever.search(qs, 3) for qs in requests]
    client = load_retriever(server.url, timeout=30, retries=0)
    errors: list[BaseException] = []
    start = time.perf_counter()

    def call(qs):
        try:
            return client.search(qs, 3)
        except BaseException as exc:  # recorded, then asserted empty
            errors.append(exc)
            raise

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, requests, timeout=60))
    assert not errors and got == expected
    assert time.perf_counter() - start < 60


def test_server_thread_shuts_down(bm25_retriever):
    srv = RetrievalServer(bm25_retriever, ServerConfig(port=0)).start()
    assert httpx.get(f"{srv.url}/health").status_code == 200
    srv.stop()
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health", timeout=2)
    assert threading.active_count() < 50


def test_collector_waits_for_as_many_requests_as_the_last_batch_and_a_lone_client_never_waits():
    """The micro-batcher's collection rule, driven directly (no HTTP, no timing bound on the retrieval)."""
    import asyncio

    from openrlhf_search.retrieval.server import Metrics, MicroBatcher, _Pending

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(retriever=None, cfg=ServerConfig(batch_wait_ms=60_000), metrics=Metrics(16))

        def pending(q):
            return _Pending([q], 1, False, loop.create_future())

        # A lone sequential client: one queued request, nobody being read -> a batch of 1 at once, even though
        # batch_wait_ms is a minute (the outer wait_for would fail the test if the collector waited).
        await batcher.queue.put(pending("a"))
        assert len(await asyncio.wait_for(batcher._collect(), 5)) == 1
        # Three requests queued together form one batch...
        for q in "bcd":
            await batcher.queue.put(pending(q))
        assert len(await asyncio.wait_for(batcher._collect(), 5)) == 3
        # ... so the next batch waits for three, even when the other two arrive 50 ms after the first.
        await batcher.queue.put(pending("e"))
        for q in "fg":
            loop.call_later(0.05, batcher.queue.put_nowait, pending(q))
        assert [p.queries[0] for p in await asyncio.wait_for(batcher._collect(), 5)] == ["e", "f", "g"]
        batcher.executor.shutdown()

    asyncio.run(scenario())
