"""Record/replay cache: record -> replay equality (in-process and over HTTP), misses, concurrent writers, SIGKILL."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from openrlhf_search.retrieval import load_retriever
from openrlhf_search.retrieval.cache import CachedRetriever, CacheMiss, RetrievalCache, index_fingerprint
from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig
from openrlhf_search.retrieval.types import Document, Hit


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.fingerprint = index_fingerprint(inner)

    def __len__(self):
        return len(self.inner)

    def search(self, queries, topk=3):
        self.calls += 1
        return self.inner.search(queries, topk)


def test_record_then_replay_is_identical_and_a_miss_names_the_query(tmp_path, bm25_dir, known_queries):
    path = tmp_path / "cache.sqlite"
    queries = list(known_queries) + ["capital"]  # duplicates across calls, and one odd query
    recorder = load_retriever(bm25_dir, cache=path, cache_mode="record")
    recorded = [recorder.search(queries, k) for k in (1, 3)]
    assert recorder.stats()["retrieve_calls"] == 2
    # replay with no index at all: equal hits (ids, contents, scores), in order
    replay = load_retriever(None, cache=path, cache_mode="replay")
    assert [replay.search(queries, k) for k in (1, 3)] == recorded
    assert replay.search(queries[::-1], 3) == recorded[1][::-1]
    stats = replay.stats()
    assert stats["hits"] == stats["lookups"] and stats["misses"] == 0 and stats["hit_rate"] == 1.0
    assert stats["lookup_ms_mean"] is not None
    with pytest.raises(CacheMiss, match="no recorded answer for query 'never asked'.*topk=3"):
        replay.search(["capital", "never asked"], 3)
    with pytest.raises(CacheMiss, match="topk=2"):  # topk is part of the key
        replay.search(["capital"], 2)


def test_reuse_mode_retrieves_only_misses(tmp_path, bm25_retriever):
    inner = Counting(bm25_retriever)
    cached = CachedRetriever(inner, tmp_path / "c.sqlite", mode="reuse")
    first = cached.search(["paris", "berlin"], 2)
    assert cached.search(["berlin", "paris"], 2) == first[::-1] and inner.calls == 1
    cached.search(["paris", "jupiter"], 2)
    assert inner.calls == 2 and cached.stats()["hits"] == 3 and cached.stats()["misses"] == 3


def test_fingerprint_separates_indexes(tmp_path, bm25_retriever):
    path = tmp_path / "c.sqlite"
    CachedRetriever(bm25_retriever, path, fingerprint="index-a").search(["paris"], 1)
    with pytest.raises(CacheMiss):
        CachedRetriever(None, path, mode="replay", fingerprint="index-b").search(["paris"], 1)
    with pytest.raises(ValueError, match="needs a retriever"):
        CachedRetriever(None, path, mode="record")
    with pytest.raises(ValueError, match="cache mode"):
        CachedRetriever(bm25_retriever, path, mode="replay-ish")


def test_server_records_and_replays_and_reports_metrics(tmp_path, bm25_retriever, known_queries):
    path = tmp_path / "server.sqlite"
    queries = list(known_queries)
    with RetrievalServer(bm25_retriever, ServerConfig(port=0, cache=str(path), cache_mode="record")) as srv:
        recorded = load_retriever(srv.url).search(queries, 3)
        assert httpx.get(f"{srv.url}/metrics").json()["cache"]["mode"] == "record"
    assert recorded == bm25_retriever.search(queries, 3)

    class Broken:  # the index is gone: replay must not touch it
        fingerprint = index_fingerprint(bm25_retriever)

        def search(self, queries, topk=3):
            raise AssertionError("replay called the retriever")

    with RetrievalServer(Broken(), ServerConfig(port=0, cache=str(path), cache_mode="replay")) as srv:
        assert load_retriever(srv.url).search(queries, 3) == recorded
        missing = httpx.post(f"{srv.url}/retrieve", json={"queries": ["never asked"]})
        assert missing.status_code == 500 and "never asked" in missing.json()["detail"]
        cache = httpx.get(f"{srv.url}/metrics").json()["cache"]
        assert cache["hits"] == len(queries) and cache["misses"] == 1
    # a recording made through the server replays in-process (same index fingerprint) and vice versa
    assert load_retriever(None, cache=path, cache_mode="replay").search(queries, 3) == recorded


def _writer(path: str, worker: int, n: int) -> None:
    cache = RetrievalCache(path)
    for i in range(n):
        hits = [Hit(Document(f"{worker}-{i}-{j}", f"text {worker} {i} {j}"), float(j)) for j in range(3)]
        cache.put("fp", {f"q-{worker}-{i}": hits, "shared": hits}, 3)


def test_concurrent_writer_processes(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    RetrievalCache(path)
    ctx = mp.get_context("fork")  # fork: no re-import per process (spawn costs ~5 s each on 2 cores)
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    cache = RetrievalCache(path)
    assert len(cache) == 4 * 40 + 1
    got = cache.get("fp", [f"q-{w}-{i}" for w in range(4) for i in range(40)], 3)
    assert all(got[f"q-{w}-{i}"][2].document.id == f"{w}-{i}-2" for w in range(4) for i in range(40))
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigkilled_writer_leaves_a_consistent_cache(tmp_path):
    path = tmp_path / "killed.sqlite"
    RetrievalCache(path)
    script = textwrap.dedent(f"""
        import sys
        from openrlhf_search.retrieval.cache import RetrievalCache
        from openrlhf_search.retrieval.types import Document, Hit
        cache = RetrievalCache({str(path)!r})
        hits = [Hit(Document("d", "x" * 2000), 1.0)] * 5
        i = 0
        while True:  # batches of 50 rows, forever, until killed
            cache.put("fp", {{f"q{{i}}-{{j}}": hits for j in range(50)}}, 5)
            i += 1
            if i == 3:
                print("writing", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    cache = RetrievalCache(path)  # opens (recovers the WAL) without error
    n = len(cache)
    assert n >= 150 and n % 50 == 0  # only whole batches: a killed transaction leaves nothing behind
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    batch = cache.get("fp", [f"q0-{j}" for j in range(50)], 5)
    assert len(batch) == 50 and batch["q0-7"][0].document.contents == "x" * 2000
    cache.put("fp", {"after": []}, 5)  # and stays writable
    assert len(cache) == n + 1


def test_not_a_database_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a usable sqlite database"):
        RetrievalCache(bad)
