"""Replicated retrieval: one client over several servers of one index, failover when a replica dies or hangs.

The headline tests start real ``openrlhf-search serve`` processes on loopback and kill (SIGKILL) or freeze
(SIGSTOP) one in the middle of a stream of batches: every batch must be answered exactly as a single server answers
it, the failover must be counted, and with every replica gone the client must raise one error naming every URL
within a bounded time. The Ray actors that start replicas on a cluster are tested in
``tests/integrations/openrlhf/test_retrieval_replicas.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from openrlhf_search.integrations.openrlhf.run import wait_for_health
from openrlhf_search.retrieval import load_retriever
from openrlhf_search.retrieval.client import CALL_STATS, HTTPRetriever, parse_urls
from openrlhf_search.retrieval.errors import ReplicaMismatch, RetrieverRequestError, RetrieverUnavailable
from openrlhf_search.retrieval.metrics import replica_metrics, replica_stats
from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig
from openrlhf_search.rollout.runner import PhaseTimer, TimedRetriever

REPO = Path(__file__).resolve().parents[2]
WORDS = ("capital France Germany mountain highest Hamlet tragedy Python language river planet largest light energy "
         "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima").split()


def query_stream(n_batches: int, seed: int = 0) -> list[list[str]]:
    """Deterministic batches of 1-6 queries of 2-5 words."""
    rng = random.Random(seed)
    return [[" ".join(rng.choices(WORDS, k=rng.randint(2, 5))) for _ in range(rng.randint(1, 6))]
            for _ in range(n_batches)]


def as_tuples(result) -> list[list[tuple[str, float]]]:
    return [[(h.document.id, round(h.score, 5)) for h in hits] for hits in result]


class ServeProcess:
    """``openrlhf-search serve --port 0`` in a subprocess; the URL is read from its start-up line."""

    def __init__(self, index: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        env.pop("OPENRLHF_SEARCH_RETRIEVER_TOKEN", None)
        env.pop("OPENRLHF_SEARCH_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "openrlhf_search", "serve", "--index", str(index),
                                      "--port", "0", "--n-threads", "1"], env=env, stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)  # fmt: skip
        self.url = ""

    def wait_url(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            lines.append(line)
            match = re.search(r" on (http://\S+)$", line.strip())
            if match:
                self.url = match.group(1)
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
                wait_for_health(self.url, timeout=max(1.0, deadline - time.monotonic()), proc=self.proc)
                return self.url
        raise RuntimeError(f"serve did not start: {''.join(lines)[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def serve(bm25_dir):
    """``serve(n[, index])``: n real servers of the test index (started in parallel), stopped at the end of the
    test."""
    started: list[ServeProcess] = []

    def start(n: int, index: Path | None = None) -> list[ServeProcess]:
        procs = [ServeProcess(index or bm25_dir) for _ in range(n)]
        started.extend(procs)
        for p in procs:
            p.wait_url()
        return procs

    yield start
    for p in started:
        p.stop()


def test_parse_urls_and_load_retriever_accept_replica_lists():
    assert parse_urls("http://a:1, http://b:2/retrieve,http://a:1") == ["http://a:1", "http://b:2"]
    assert parse_urls(["http://a:1/"]) == ["http://a:1"]
    with pytest.raises(ValueError, match="'a:1'"):
        parse_urls("http://b:2,a:1")
    client = load_retriever("http://127.0.0.1:1,http://127.0.0.1:2")
    assert isinstance(client, HTTPRetriever) and client.urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert load_retriever(["http://127.0.0.1:3"]).urls == ["http://127.0.0.1:3"]


def test_killed_replica_mid_stream_loses_nothing_and_counts_the_failover(serve):
    procs = serve(3)
    urls = [p.url for p in procs]
    stream = query_stream(60)
    with HTTPRetriever(urls[0], retries=0) as single:  # what one server answers
        expected = [as_tuples(single.search(batch, 3)) for batch in stream]
    # retries=0: one round, so only a move to another replica can save a batch (no backoff retry of the same one)
    client = HTTPRetriever(urls, retries=0, timeout=10, reprobe_s=60)
    answers: dict[int, list] = {}
    errors: list[BaseException] = []
    answered = threading.Semaphore(0)

    def worker(indices: list[int]) -> None:
        try:
            for i in indices:
                answers[i] = as_tuples(client.search(stream[i], 3))
                answered.release()
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(list(range(k, len(stream), 4)),)) for k in range(4)]
    for t in threads:
        t.start()
    for _ in range(15):  # a quarter of the stream answered: kill one replica while the others are in flight
        assert answered.acquire(timeout=60)
    procs[1].proc.kill()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(answers) == list(range(len(stream)))
    assert [answers[i] for i in range(len(stream))] == expected  # every batch, exactly
    stats = client.replica_stats()
    assert stats["failovers"] >= 1 and stats["replica_errors"] >= 1
    assert stats["marked_down"] == 1 and stats["replicas_up"] == 2
    assert stats["requests"] >= len(stream)  # and the /health reads of the limits
    down = client.replicas[1]
    assert not down.up and down.errors >= 1
    assert all(r.answered > 0 for r in client.replicas)  # the load was spread before the kill
    client.close()


def test_hung_replica_times_out_fails_over_and_is_reprobed_back(serve):
    procs = serve(2)
    urls = [p.url for p in procs]
    stream = query_stream(12, seed=1)
    with HTTPRetriever(urls[1], retries=0) as single:
        expected = [as_tuples(single.search(batch, 3)) for batch in stream]
    client = HTTPRetriever(urls, retries=0, timeout=5.0, reprobe_s=0.5, probe_timeout=0.5)
    assert client.check_replicas() == {urls[0]: True, urls[1]: True}
    procs[0].proc.send_signal(signal.SIGSTOP)  # hung, not dead: only the timeout can tell
    try:
        got = [as_tuples(client.search(batch, 3)) for batch in stream[:6]]
        assert client.replica_stats()["failovers"] == 1 and "ReadTimeout" in client.replicas[0].last_error
        assert client.check_replicas() == {urls[0]: False, urls[1]: True}
    finally:
        procs[0].proc.send_signal(signal.SIGCONT)
    with HTTPRetriever(urls[0], timeout=60) as direct:  # resumed: let it finish its backlog first
        direct.search(["capital of France"], 1)
    time.sleep(0.6)  # past reprobe_s: the next request re-probes the replica and it takes requests again
    got += [as_tuples(client.search(batch, 3)) for batch in stream[6:]]
    assert got == expected
    stats = client.replica_stats()
    assert stats["recovered"] >= 1 and client.replicas[0].answered >= 1  # back in the rotation after the probe
    client.close()


def test_every_replica_dead_raises_one_error_naming_every_url_in_bounded_time(serve):
    procs = serve(2)
    urls = [p.url for p in procs]
    client = HTTPRetriever(urls, retries=2, backoff=0.05, timeout=2)
    assert client.search(["capital of France"], 1)[0][0].document.id == "paris"
    for p in procs:
        p.proc.kill()
        p.proc.wait(30)
    start = time.monotonic()
    with pytest.raises(RetrieverUnavailable) as err:
        client.search(["capital of France"], 1)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "no retrieval replica left" in message and "3 round(s)" in message
    assert all(f"{u}/retrieve: ConnectError" in message for u in urls)
    with pytest.raises(RetrieverUnavailable, match="no retrieval replica left"):
        asyncio.run(client.asearch(["capital of France"], 1))


class Flaky:
    """A retriever that fails every call with ``fail`` set, and counts its calls."""

    def __init__(self, inner, fail: bool = False):
        self.inner, self.fail, self.calls = inner, fail, 0

    def __len__(self):
        return len(self.inner)

    def search(self, queries, topk=3):
        self.calls += 1
        if self.fail:
            raise RuntimeError("replica broken")
        return self.inner.search(queries, topk)


def test_5xx_moves_the_request_to_another_replica_never_the_same_one(bm25_retriever):
    broken, good = Flaky(bm25_retriever, fail=True), Flaky(bm25_retriever)
    with RetrievalServer(broken, ServerConfig(port=0)) as a, RetrievalServer(good, ServerConfig(port=0)) as b:
        # explicit limits: no /health read first, so the first request goes to the first (broken) replica
        client = HTTPRetriever([a.url, b.url], retries=3, backoff=30.0, reprobe_s=60, max_queries_per_request=64)
        start = time.monotonic()
        hits = client.search(["capital of France"], 1)
        assert time.monotonic() - start < 20  # answered by the other replica at once: no backoff sleep (>= 22.5 s)
        assert hits[0][0].document.id == "paris"
        assert broken.calls == 1 and good.calls == 1  # the failed replica was not asked again
        for _ in range(5):  # marked down: nothing more goes to it until it is re-probed
            client.search(["capital of France"], 1)
        assert broken.calls == 1 and good.calls == 6
        assert client.replica_stats()["failovers"] == 1
        client.close()


def test_4xx_is_not_moved_to_another_replica(bm25_retriever):
    first, second = Flaky(bm25_retriever), Flaky(bm25_retriever)
    cfg = ServerConfig(port=0, max_topk=5)
    with RetrievalServer(first, cfg) as a, RetrievalServer(second, cfg) as b:
        client = HTTPRetriever([a.url, b.url], retries=3)
        with pytest.raises(RetrieverRequestError, match="HTTP 422"):
            client.search(["x"], 6)
        assert client.replica_stats() | {"replicas_up": 2} == client.replica_stats()  # nobody marked down
        assert client.replica_stats()["replica_errors"] == 0
        client.close()


def test_requests_spread_over_replicas(bm25_retriever):
    counters = [Flaky(bm25_retriever) for _ in range(3)]
    servers = [RetrievalServer(c, ServerConfig(port=0)).start() for c in counters]
    try:
        client = HTTPRetriever([s.url for s in servers], max_queries_per_request=64)
        for batch in query_stream(30, seed=2):
            client.search(batch, 2)
        assert [c.calls for c in counters] == [10, 10, 10]  # round-robin among equally loaded replicas
        asyncio.run(client.asearch(["capital of France"], 1))
        assert sum(c.calls for c in counters) == 31
        client.close()
    finally:
        for s in servers:
            s.stop()


def test_failovers_reach_the_trainer_metrics_and_the_callers_context(bm25_retriever):
    good = Flaky(bm25_retriever)
    with RetrievalServer(good, ServerConfig(port=0)) as srv:
        dead = f"http://127.0.0.1:{_closed_port()}"
        client = HTTPRetriever([dead, srv.url], retries=0, max_queries_per_request=64)
        timed = TimedRetriever(client, PhaseTimer())  # the local trainer's wrapper
        before = replica_stats(timed)
        calls: dict = {}
        token = CALL_STATS.set(calls)
        try:
            timed.search(["capital of France"], 1)  # the dead replica comes first in the round-robin order
        finally:
            CALL_STATS.reset(token)
        timed.search(["capital of France"], 1)
        metrics = replica_metrics(before, replica_stats(timed))
        assert metrics == {"retrieval/failover": 1.0, "retrieval/replica_errors": 1.0, "retrieval/replicas_up": 1.0,
                           "retrieval/replicas": 2.0}
        assert calls == {"failovers": 1, "replica_errors": 1}  # only the call made inside the context
        assert replica_stats(bm25_retriever) is None and replica_metrics(None, None) == {}
        client.close()


def test_replicas_of_different_indexes_are_refused(bm25_retriever):
    one = RetrievalServer(bm25_retriever, ServerConfig(port=0), info={"fingerprint": "index-a"}).start()
    other = RetrievalServer(bm25_retriever, ServerConfig(port=0), info={"fingerprint": "index-b"}).start()
    same = RetrievalServer(bm25_retriever, ServerConfig(port=0), info={"fingerprint": "index-a"}).start()
    try:
        with pytest.raises(ReplicaMismatch, match=f"{one.url}: index-a, {other.url}: index-b"):
            HTTPRetriever([one.url, other.url]).search(["capital of France"], 1)
        with pytest.raises(ReplicaMismatch):
            HTTPRetriever([one.url, same.url, other.url]).get_documents(["paris"])
        assert HTTPRetriever([one.url, same.url]).search(["capital of France"], 1)[0][0].document.id == "paris"
    finally:
        for s in (one, other, same):
            s.stop()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _e2e_assets(tmp_path_factory):
    """The OpenRLHF end-to-end tests' SFT-warm-started tiny model, index and knowledge base (it searches; a random
    model never does): reused from ``$OPENRLHF_SEARCH_E2E_CACHE`` when set, else built (minutes)."""
    import importlib.util

    path = REPO / "tests" / "integrations" / "openrlhf" / "openrlhf_e2e_assets.py"
    spec = importlib.util.spec_from_file_location("openrlhf_e2e_assets", path)
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    cache = os.environ.get("OPENRLHF_SEARCH_E2E_CACHE")
    return module.build_assets((Path(cache) if cache else tmp_path_factory.mktemp("e2e")) / "assets")


@pytest.mark.slow
def test_training_run_goes_on_when_a_replica_dies(serve, tmp_path, tmp_path_factory):
    """A local training run over three replicas, one SIGKILLed after step 1, logs exactly what the same run over one
    server logs (rewards, losses, searches, golden-in-top-k...), plus the failover."""
    import json

    assets = _e2e_assets(tmp_path_factory)
    procs = serve(3, assets.index_dir)
    urls = [p.url for p in procs]

    def train(out: Path, spec: str, kill_after: int | None = None) -> list[dict]:
        args = [sys.executable, "-m", "openrlhf_search", "train", f"model.path={assets.model_dir}",
                f"retriever.spec={spec}", "retriever.timeout=10", "env.topk=2", "data.source=synthetic",
                f"data.seed={assets.kb_seed}", f"data.num_entities={assets.n_entities}", "data.num_train=64",
                "data.num_eval=4", "steps=4", "seed=0", "rollout.prompts_per_step=2", "rollout.group_size=4",
                "env.max_turns=3", "env.max_tokens_per_turn=40", "env.max_obs_tokens=60",
                "env.max_response_tokens=240", "algorithm.name=grpo", "optimizer.lr=1e-4",
                f"logging.output_dir={out}", "logging.save_every=0", "logging.tensorboard=false"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        metrics, killed = out / "metrics.jsonl", False
        deadline = time.monotonic() + 1200
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_after and not killed and metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
                procs[1].proc.kill()  # mid-run: after step 1, before the others
                killed = True
            time.sleep(0.1)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert kill_after is None or killed
        return [json.loads(line) for line in metrics.read_text().splitlines()]

    single = train(tmp_path / "single", urls[0])
    replicated = train(tmp_path / "replicas", ",".join(urls), kill_after=1)

    def comparable(row: dict) -> dict:
        return {k: v for k, v in row.items() if not k.startswith(("time/", "memory/", "retrieval/failover",
                "retrieval/replica", "retrieval/latency")) and "per_s" not in k}  # fmt: skip

    assert len(replicated) == len(single) == 4
    assert sum(r["searches_per_traj"] for r in single) > 0  # the model searches: there is something to lose
    assert [comparable(r) for r in replicated] == [comparable(r) for r in single]  # nothing lost
    assert sum(r["retrieval/failover"] for r in replicated) >= 1  # the failover is in the metrics
    assert replicated[-1]["retrieval/replicas_up"] == 2 and replicated[-1]["retrieval/replicas"] == 3
    assert replicated[0]["retrieval/failover"] == 0 and replicated[0]["retrieval/replicas_up"] == 3
