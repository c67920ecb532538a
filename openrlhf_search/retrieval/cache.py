"""A persistent, shared record/replay cache of retrieval answers (sqlite in WAL mode).

Why: a training run's retrieval is then reproducible bit for bit, and a slow, paid or GPU retriever (a web search
API, a dense index on a GPU) can be replaced by its recording in ablations and tests.

Key: ``(index fingerprint, query, topk)``. The fingerprint names the index, not the process: for an index directory
it is a hash of its manifest (method, passage count, corpus SHA-256, build parameters, encoder), for a server it is
what ``/health`` reports, so a recording made in-process replays over HTTP and vice versa, and a rebuilt index
(other corpus or parameters) never answers from a stale recording. The value is the hit list as JSON (ids,
contents, scores), so a replayed answer equals the recorded one exactly.

Modes (:data:`MODES`):

* ``record``: every query goes to the retriever; every answer is stored (overwriting an older recording);
* ``replay``: every answer comes from the cache; a miss raises :class:`CacheMiss` naming the query (the retriever
  may be absent);
* ``reuse``: hits come from the cache, misses go to the retriever and are stored.

Concurrency and crashes: every writer (threads, processes, the server and clients at once) commits each batch in
one transaction; WAL mode lets readers proceed during a write and a ``busy_timeout`` serialises writers. A process
killed (SIGKILL) mid-write loses at most its uncommitted batch: sqlite rolls it back on the next open, and every
committed row stays readable.

Metrics (:meth:`CachedRetriever.stats`): lookups, hits, misses, hit rate, mean lookup and retriever latency; the
server adds them to ``/metrics``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from .types import Document, Hit, Retriever

MODES = ("record", "replay", "reuse")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    fingerprint TEXT NOT NULL,
    query TEXT NOT NULL,
    topk INTEGER NOT NULL,
    hits TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (fingerprint, query, topk)
) WITHOUT ROWID
"""


class CacheMiss(LookupError):
    """``replay`` mode: a query has no recorded answer."""


def manifest_fingerprint(manifest) -> str:
    """Hex digest of what determines an index's answers (not its build time or path)."""
    key = {"method": manifest.method, "count": manifest.count, "corpus_sha256": manifest.corpus_sha256,
           "corpus_size": manifest.corpus_size, "encoder": manifest.encoder, "params": manifest.params}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def index_fingerprint(retriever) -> str:
    """The fingerprint of a retriever's index: its ``fingerprint`` attribute, else its index manifest's.

    Raises:
        ValueError: the retriever has neither (pass ``fingerprint=`` explicitly).
    """
    fp = getattr(retriever, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    manifest = getattr(getattr(retriever, "index", None), "manifest", None)
    if manifest is not None:
        return manifest_fingerprint(manifest)
    raise ValueError(f"cannot fingerprint a {type(retriever).__name__}; pass fingerprint= to the cache")


class RetrievalCache:
    """The sqlite store: ``get``/``put`` batches of answers. Thread-safe (one connection per thread)."""

    def __init__(self, path: str | os.PathLike, timeout: float = 60.0):
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.execute(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.DatabaseError as exc:
                raise ValueError(f"retrieval cache {self.path}: not a usable sqlite database ({exc})") from None
            self._local.conn = conn
        return conn

    def get(self, fingerprint: str, queries: list[str], topk: int) -> dict[str, list[Hit]]:
        """Recorded answers of the distinct ``queries`` that have one (``query -> hits``)."""
        out: dict[str, list[Hit]] = {}
        distinct = list(dict.fromkeys(queries))
        conn = self._conn()
        for start in range(0, len(distinct), 500):  # sqlite's bound-parameter limit
            part = distinct[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = conn.execute(f"SELECT query, hits FROM answers WHERE fingerprint = ? AND topk = ? "
                                f"AND query IN ({marks})", [fingerprint, int(topk), *part]).fetchall()
            for query, hits in rows:
                out[query] = [Hit(Document.from_json(d), s) for d, s in json.loads(hits)]
        return out

    def put(self, fingerprint: str, answers: dict[str, list[Hit]], topk: int) -> None:
        """Store ``query -> hits`` in ONE transaction (all or nothing, even if the process is killed)."""
        now = time.time()
        rows = [(fingerprint, q, int(topk), json.dumps([[h.document.to_json(), float(h.score)] for h in hits]), now)
                for q, hits in answers.items()]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def fingerprints(self) -> list[str]:
        """Distinct index fingerprints recorded."""
        return [r[0] for r in self._conn().execute("SELECT DISTINCT fingerprint FROM answers")]

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class CachedRetriever:
    """A :class:`Retriever` answering through a :class:`RetrievalCache` in ``record``/``replay``/``reuse`` mode.

    Args:
        inner: the real retriever (may be ``None`` in ``replay`` mode).
        cache: a :class:`RetrievalCache` or the path of its sqlite file.
        mode: one of :data:`MODES`.
        fingerprint: the index fingerprint; default :func:`index_fingerprint` of ``inner`` or, in replay mode
            without ``inner``, the cache's only recorded fingerprint.
    """

    def __init__(self, inner: Retriever | None, cache: RetrievalCache | str | os.PathLike, mode: str = "record",
                 fingerprint: str | None = None):
        if mode not in MODES:
            raise ValueError(f"cache mode must be one of {MODES}, got {mode!r}")
        if inner is None and mode != "replay":
            raise ValueError(f"cache mode {mode!r} needs a retriever (only 'replay' works without one)")
        self.inner = inner
        self.cache = cache if isinstance(cache, RetrievalCache) else RetrievalCache(cache)
        self.mode = mode
        if fingerprint is None:
            if inner is not None:
                fingerprint = index_fingerprint(inner)
            else:
                known = self.cache.fingerprints()
                if len(known) != 1:
                    raise ValueError(f"retrieval cache {self.cache.path} holds {len(known)} index fingerprints; "
                                     "pass fingerprint= to choose one")
                fingerprint = known[0]
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._stats = {"lookups": 0, "hits": 0, "misses": 0, "lookup_seconds": 0.0, "retrieve_seconds": 0.0,
                       "retrieve_calls": 0}

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None and hasattr(self.inner, "__len__") else 0

    def _count(self, **deltas) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._stats[key] += value

    def _retrieve(self, queries: list[str], topk: int) -> dict[str, list[Hit]]:
        t0 = time.perf_counter()
        distinct = list(dict.fromkeys(queries))
        found = dict(zip(distinct, self.inner.search(distinct, topk)))
        self._count(retrieve_seconds=time.perf_counter() - t0, retrieve_calls=1)
        self.cache.put(self.fingerprint, found, topk)
        return found

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of query strings, not a single string")
        queries = list(queries)
        if not queries:
            return []
        if self.mode == "record":
            found = self._retrieve(queries, topk)
            return [found[q] for q in queries]
        t0 = time.perf_counter()
        found = self.cache.get(self.fingerprint, queries, topk)
        missing = [q for q in dict.fromkeys(queries) if q not in found]
        hits = len(set(queries)) - len(missing)
        self._count(lookups=len(set(queries)), hits=hits, misses=len(missing),
                    lookup_seconds=time.perf_counter() - t0)
        if missing:
            if self.mode == "replay":
                raise CacheMiss(f"retrieval cache {self.cache.path} (replay mode): no recorded answer for query "
                                f"{missing[0]!r} (topk={topk}, index {self.fingerprint[:16]}); "
                                f"{len(missing)} of {len(set(queries))} queries missing -- record them first")
            found.update(self._retrieve(missing, topk))
        return [found[q] for q in queries]

    async def asearch(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        import asyncio

        return await asyncio.to_thread(self.search, queries, topk)

    def stats(self) -> dict[str, float]:
        """Counters since creation: lookups/hits/misses, hit rate, mean lookup and retriever latency (ms)."""
        with self._lock:
            s = dict(self._stats)
        return {"mode": self.mode, "lookups": s["lookups"], "hits": s["hits"], "misses": s["misses"],
                "hit_rate": s["hits"] / s["lookups"] if s["lookups"] else None,
                "lookup_ms_mean": 1000 * s["lookup_seconds"] / s["lookups"] if s["lookups"] else None,
                "retrieve_calls": s["retrieve_calls"],
                "retrieve_ms_mean": 1000 * s["retrieve_seconds"] / s["retrieve_calls"] if s["retrieve_calls"]
                else None}

    def __repr__(self) -> str:
        return f"CachedRetriever({self.inner!r}, {str(self.cache.path)!r}, mode={self.mode!r})"


def with_cache(retriever: Retriever | None, cache: str | os.PathLike | None, mode: str = "record",
               fingerprint: str | None = None) -> Retriever:
    """``retriever`` wrapped in a :class:`CachedRetriever` when ``cache`` is a path; unchanged when it is empty."""
    if not cache:
        if retriever is None:
            raise ValueError("no retriever and no cache")
        return retriever
    return CachedRetriever(retriever, cache, mode=mode, fingerprint=fingerprint)
