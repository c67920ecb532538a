"""HTTPRetriever: retries with backoff on connection errors / 5xx, timeouts, no retry on 4xx, clear final error."""

from __future__ import annotations

import socket
import time

import pytest

from openrlhf_search.retrieval import load_retriever
from openrlhf_search.retrieval.client import HTTPRetriever, RetrieverRequestError, RetrieverUnavailable
from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig


class Scripted:
    """A retriever that fails its first ``failures`` calls, or sleeps ``delay`` seconds per call."""

    def __init__(self, inner, failures: int = 0, delay: float = 0.0):
        self.inner, self.failures, self.delay, self.calls = inner, failures, delay, 0

    def __len__(self):
        return len(self.inner)

    def search(self, queries, topk=3):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"transient failure {self.calls}")
        time.sleep(self.delay)
        return self.inner.search(queries, topk)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_raises_unavailable_after_retries():
    url = f"http://127.0.0.1:{_closed_port()}"
    client = HTTPRetriever(url, timeout=2, retries=2, backoff=0.05)
    start = time.perf_counter()
    with pytest.raises(RetrieverUnavailable) as err:
        client.search(["paris"], 3)
    elapsed = time.perf_counter() - start
    assert url in str(err.value) and "3 attempt(s)" in str(err.value) and "ConnectError" in str(err.value)
    assert 0.05 * 0.75 * (1 + 2) <= elapsed < 5  # two backoff sleeps (0.05 s, 0.1 s, +-25% jitter)


def test_5xx_is_retried_until_success(bm25_retriever):
    flaky = Scripted(bm25_retriever, failures=2)
    with RetrievalServer(flaky, ServerConfig(port=0)) as srv:
        with HTTPRetriever(srv.url, retries=2, backoff=0.01) as client:
            hits = client.search(["paris"], 1)
    assert hits[0][0].document.id == "paris" and flaky.calls == 3


def test_5xx_exhausts_retries(bm25_retriever):
    broken = Scripted(bm25_retriever, failures=100)
    with RetrievalServer(broken, ServerConfig(port=0)) as srv:
        with pytest.raises(RetrieverUnavailable, match=r"HTTP 500: retrieval failed: RuntimeError: transient"):
            with HTTPRetriever(srv.url, retries=1, backoff=0.01) as client:
                client.search(["paris"], 1)
    assert broken.calls == 2


def test_4xx_is_not_retried(bm25_retriever):
    counting = Scripted(bm25_retriever)
    with RetrievalServer(counting, ServerConfig(port=0, max_topk=5)) as srv:
        client = HTTPRetriever(srv.url + "/retrieve", retries=3, backoff=1.0)  # a '/retrieve' suffix is accepted
        start = time.perf_counter()
        with pytest.raises(RetrieverRequestError) as err:
            client.search(["x"], 6)
        assert time.perf_counter() - start < 1.0  # no backoff sleep happened
        assert err.value.status == 422 and "cap is max_topk=5" in str(err.value)
        assert client.health()["status"] == "ok"
        client.close()
    assert counting.calls == 0


def test_slow_server_times_out(bm25_retriever):
    slow = Scripted(bm25_retriever, delay=0.8)
    with RetrievalServer(slow, ServerConfig(port=0)) as srv:
        client = HTTPRetriever(srv.url, timeout=0.2, retries=1, backoff=0.01)
        start = time.perf_counter()
        with pytest.raises(RetrieverUnavailable, match="ReadTimeout"):
            client.search(["paris"], 1)
        assert time.perf_counter() - start < 0.75  # gave up before the server answered
        client.close()


def test_load_retriever_url_and_protocol_checks(bm25_retriever):
    with RetrievalServer(bm25_retriever, ServerConfig(port=0)) as srv:
        client = load_retriever(srv.url, timeout=5)
        assert isinstance(client, HTTPRetriever) and client.search([], 3) == []
        assert client.search(["paris", "berlin"], 2) == bm25_retriever.search(["paris", "berlin"], 2)
        with pytest.raises(TypeError):
            client.search("paris", 1)
        client.close()
    with pytest.raises(ValueError, match="retries >= 0"):
        HTTPRetriever("http://127.0.0.1:1", retries=-1)


def test_wrong_service_is_a_clear_error():
    from openrlhf_search.retrieval.client import parse_result

    with pytest.raises(RetrieverUnavailable, match="answered 1 result lists for 2 queries"):
        parse_result("http://x", {"result": [[]]}, 2)
    with pytest.raises(RetrieverUnavailable, match="Search-R1 /retrieve server"):
        parse_result("http://x", {"status": "ok"}, 1)


def test_async_search_matches_and_retries(bm25_retriever):
    import asyncio

    flaky = Scripted(bm25_retriever, failures=1)
    with RetrievalServer(flaky, ServerConfig(port=0)) as srv, HTTPRetriever(srv.url, retries=1, backoff=0.01) as c:
        hits = asyncio.run(c.asearch(["paris", "berlin"], 2))
        assert hits == bm25_retriever.search(["paris", "berlin"], 2) and flaky.calls == 2
        assert asyncio.run(c.asearch([], 2)) == []
    with pytest.raises(RetrieverUnavailable, match="unavailable after 2 attempt"):
        asyncio.run(HTTPRetriever(f"http://127.0.0.1:{_closed_port()}", retries=1, backoff=0.01).asearch(["x"]))
