"""A Search-R1-compatible retrieval server that micro-batches concurrent requests.

Protocol (Search-R1 ``retrieval_server.py``, so Search-R1 / verl search tools work unchanged)::

    POST /retrieve  {"queries": ["q1", ...], "topk": 3, "return_scores": true}
      -> {"result": [[{"document": row, "score": s}, ...], ...]}
         (with "return_scores": false each hit is the bare row, as in Search-R1; "queries": [] -> "result": [])
    POST /access    {"urls": ["https://...", ...]} -> {"result": [page | null, ...]}   (ASearcher's page tool)
    POST /documents {"keys": ["doc id or title", ...]} -> {"documents": [row | null, ...]}
                  (whole documents for the environment's ``open`` tool; retrievers with ``get_documents``)
    GET /health   -> {"status": "ok", "documents": N, "method": ..., "fingerprint": ..., "limits": {...}}
    GET /metrics  -> counters, latency p50/p90/p99, batch-size statistics

A ``row`` is the corpus row as stored: ``id``, ``contents`` and every other field the corpus carries (``url``,
``wikipedia_title``, ``title``...), as Search-R1's and ASearcher's servers return it.

The request shapes of the other search-agent frameworks are accepted too, all answered by the same batcher:
``"query": "one string"`` instead of ``"queries"`` (SkyRL-gym, rLLM), ``"top_k"`` or ``"k"`` instead of ``"topk"``
(rLLM); a single-string request is answered with ``"result": [[hits]]`` (what SkyRL-gym reads) plus rLLM's keys
``"results": [{"id", "content": row, "score"}, ...]``, ``"query"`` and ``"num_results"``.
docs/retrieval.md's compatibility table lists which client reads what; tests run each client's own code.

Why micro-batching: Search-R1's server answers one request at a time inside the event loop, so 16 rollout workers
each sending one query wait for each other, and every query pays a full retrieval call. Here every request goes
into a queue; a single collector takes the first waiting request, keeps collecting until ``batch_wait_ms`` has
passed or ``max_batch_queries`` are gathered, and runs ONE retrieval call for all of them in a worker thread (the
event loop keeps accepting requests meanwhile; requests that arrive during a call form the next batch). The
wait ends early once no other request is being received and the batch holds as many requests as the previous one,
so a lone sequential client pays no batching delay while 16 concurrent clients are not split into batches of 1 + 15.
Requests with different ``topk`` share the call: it retrieves ``max(topk)`` and each request keeps its own prefix,
which is exact because in-process retrievers order hits by (score, document row) -- ties included -- so a top-k is
always the prefix of a top-(k+1) (see :meth:`InProcessRetriever.search_rows`); other retrievers get one call per
distinct ``topk``.

Robustness, chosen so that a training run never fails on a limit meant for abuse: a query longer than
``max_query_chars`` is truncated (counted in ``/metrics`` and the ``X-Truncated-Queries`` response header) and the
batch is answered; ``topk`` is accepted up to ``max_topk``; the body is read with a size cap and a deadline
(``read_timeout_s``, headers too), decoded as strict UTF-8 and validated field by field; every bad request gets a
4xx JSON ``{"detail": message}``; connections beyond ``max_connections`` get a 503 at once; a retrieval failure gets
a 500 for the requests of that batch and the server keeps serving; on shutdown a request still being received gets
a 503 and the server exits without waiting out its grace period. It binds to 127.0.0.1 unless told otherwise and
can require a bearer token.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import h11
import numpy as np
from fastapi import Request  # a core dependency; resolved at module level for FastAPI's annotation lookup

from . import jsonfast
from .cache import CachedRetriever, index_fingerprint
from .inprocess import InProcessRetriever
from .types import Retriever


@dataclass
class ServerConfig:
    """Limits and batching of the retrieval server."""

    host: str = "127.0.0.1"
    """Bind address (loopback by default; use 0.0.0.0 deliberately, ideally with a token)."""
    port: int = 8000
    """TCP port (0: any free port)."""
    token: str | None = None
    """If set, ``/retrieve`` and ``/metrics`` require ``Authorization: Bearer <token>``."""
    default_topk: int = 3
    """``topk`` when the request omits it (Search-R1's default)."""
    max_topk: int = 1000
    """Largest accepted ``topk`` (a request above it gets a 422 naming this cap); an index with fewer documents
    answers what it has."""
    max_queries_per_request: int = 4096
    """Largest accepted ``len(queries)``: above the 2,560 that Search-R1's shipped GRPO recipe sends in one POST
    (512 prompts x 5 samples); advertised in ``/health`` so our client splits larger batches."""
    max_query_chars: int = 4096
    """Queries longer than this many characters are truncated to it (counted in ``/metrics`` and the
    ``X-Truncated-Queries`` header), never refused: a policy in training writes such queries."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest accepted request body (advertised in ``/health``): the abuse limit (413 above it)."""
    read_timeout_s: float = 30.0
    """Seconds a client may take to send a request's headers, and again its body (408 after that)."""
    max_connections: int = 768
    """Open connections beyond this are answered 503 and closed at once (keeps the server below a 1,024-descriptor
    limit when clients hold connections open)."""
    keep_alive_s: float = 30.0
    """An idle keep-alive connection is closed after this many seconds."""
    shutdown_grace_s: float = 10.0
    """On shutdown, how long requests already received may take to be answered."""
    batch_wait_ms: float = 5.0
    """How long the collector waits for more requests after the first one of a batch."""
    max_batch_queries: int = 1024
    """Upper bound on queries per retrieval call (a single larger request is never split: it runs alone)."""
    latency_window: int = 10_000
    """Number of recent requests kept for the latency quantiles."""
    cache: str | None = None
    """Path of a record/replay cache (sqlite, see :mod:`openrlhf_search.retrieval.cache`); ``None``: no cache."""
    cache_mode: str = "record"
    """``record`` (store every answer), ``replay`` (answer only from the cache) or ``reuse`` (hits from the cache,
    misses retrieved and stored)."""


class BadRequest(Exception):
    """A client error: ``status`` and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _decode_json_strictly(body: bytes):
    """Slow path with precise messages: strict UTF-8, then stdlib JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise BadRequest(400, f"request body is not valid JSON: {exc.msg} ({where})") from None
    except RecursionError:
        raise BadRequest(400, "request body is nested too deeply (JSON arrays/objects more than ~1000 levels "
                              "deep); send {\"queries\": [...], \"topk\": k}") from None


class RetrieveRequest(NamedTuple):
    """A validated ``/retrieve`` body."""

    queries: list[str]
    topk: int
    return_scores: bool
    single: bool
    """The request sent one query string (``"query": "..."``): answered with rLLM's keys as well."""
    truncated: int
    """How many queries were longer than ``max_query_chars`` and were truncated."""


_TOPK_KEYS = ("topk", "top_k", "k")


def parse_retrieve_request(body: bytes, cfg: ServerConfig) -> RetrieveRequest:
    """Validate a ``/retrieve`` body (every shape in the module docstring) or raise :class:`BadRequest`."""
    try:
        payload = jsonfast.loads(body)
    except (ValueError, RecursionError):  # the fast decoder refused: redo it slowly for a message naming the problem
        payload = _decode_json_strictly(body)
    if not isinstance(payload, dict):
        raise BadRequest(422, f"request body must be a JSON object, got {type(payload).__name__}")
    if "queries" in payload and "query" in payload:
        raise BadRequest(422, "send either 'queries' (a list of strings) or 'query' (one string), not both")
    name = "queries" if "queries" in payload else "query"
    if name not in payload:
        raise BadRequest(422, "field 'queries' is required (a list of strings; 'query': one string is accepted too)")
    queries = payload[name]
    single = isinstance(queries, str)
    if single:
        queries = [queries]
    if not isinstance(queries, list):
        raise BadRequest(422, f"field '{name}' must be a list of strings or one string, got {type(queries).__name__}")
    if len(queries) > cfg.max_queries_per_request:
        limit = cfg.max_queries_per_request
        raise BadRequest(413, f"too many queries: {len(queries)} > max_queries_per_request={limit}")
    truncated = 0
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise BadRequest(422, f"{name}[{i}] must be a string, got {type(q).__name__}")
        try:
            q.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(422, f"{name}[{i}] contains an unpaired surrogate (not encodable as UTF-8)") from None
        if len(q) > cfg.max_query_chars:
            if not truncated:
                queries = list(queries)
            queries[i] = q[: cfg.max_query_chars]
            truncated += 1
    given = {key: payload[key] for key in _TOPK_KEYS if payload.get(key) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise BadRequest(422, f"fields {sorted(given)} disagree ({given}); send one of them")
    key, topk = next(iter(given.items()), ("topk", None))
    if isinstance(topk, bool) or not isinstance(topk, (int, type(None))):
        raise BadRequest(422, f"field '{key}' must be an integer, got {type(topk).__name__}")
    if not topk:  # absent, null or 0: the default, as Search-R1's server does ("if not request.topk")
        topk = cfg.default_topk
    if topk < 0:
        raise BadRequest(422, f"field '{key}' must be positive, got {topk}")
    if topk > cfg.max_topk:
        raise BadRequest(422, f"field '{key}' is {topk}; this server's cap is max_topk={cfg.max_topk} "
                              "(openrlhf-search serve --max-topk)")
    return_scores = payload.get("return_scores", False)
    if return_scores is None:
        return_scores = False
    if not isinstance(return_scores, bool):
        raise BadRequest(422, f"field 'return_scores' must be a boolean, got {type(return_scores).__name__}")
    return RetrieveRequest(queries, topk, return_scores, single, truncated)


def _response_body(per_query: list[list[tuple[dict, float]]], topk: int, return_scores: bool, single: bool,
                   queries: list[str]) -> bytes:
    """The JSON body of one request from its ``(row, score)`` lists (every response shape is built here)."""
    if return_scores:  # Search-R1: {"document": row, "score": s}; without scores the bare row
        result = [[{"document": d, "score": s} for d, s in hits[:topk]] for hits in per_query]
    else:
        result = [[d for d, _ in hits[:topk]] for hits in per_query]
    if not single:
        return jsonfast.dumps({"result": result})
    hits = per_query[0][:topk]
    return jsonfast.dumps({"result": result, "query": queries[0], "num_results": len(hits),
                           "results": [{"id": d["id"], "content": d, "score": s} for d, s in hits]})


class Metrics:
    """Counters and recent latencies/batch sizes; ``snapshot()`` is what ``GET /metrics`` returns."""

    def __init__(self, window: int):
        self.started = time.time()
        self.requests = 0
        self.queries = 0
        self.client_errors = 0
        self.server_errors = 0
        self.truncated_queries = 0
        self.read_timeouts = 0
        self.rejected_connections = 0
        self.shutdown_refused = 0
        self.batches = 0
        self.latencies: deque[float] = deque(maxlen=window)
        self.batch_sizes: deque[int] = deque(maxlen=window)
        self.retrieval_seconds = 0.0

    def snapshot(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies, dtype=np.float64) * 1000.0
        sizes = np.asarray(self.batch_sizes, dtype=np.float64)
        q = (lambda a, p: float(np.percentile(a, p)) if a.size else None)
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests": self.requests,
            "queries": self.queries,
            "client_errors": self.client_errors,
            "server_errors": self.server_errors,
            "truncated_queries": self.truncated_queries,
            "read_timeouts": self.read_timeouts,
            "rejected_connections": self.rejected_connections,
            "shutdown_refused": self.shutdown_refused,
            "batches": self.batches,
            "retrieval_seconds": round(self.retrieval_seconds, 6),
            "latency_ms": {"p50": q(lat, 50), "p90": q(lat, 90), "p99": q(lat, 99), "window": int(lat.size)},
            "batch_queries": {
                "mean": float(sizes.mean()) if sizes.size else None,
                "p50": q(sizes, 50),
                "max": float(sizes.max()) if sizes.size else None,
            },
        }


@dataclass
class _Pending:
    queries: list[str]
    topk: int
    return_scores: bool
    future: asyncio.Future
    single: bool = False


class MicroBatcher:
    """Collects concurrent requests into bounded batches and runs each batch in one worker thread."""

    def __init__(self, retriever: Retriever, cfg: ServerConfig, metrics: Metrics):
        self.retriever = retriever
        self.cfg = cfg
        self.metrics = metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")
        self._task: asyncio.Task | None = None
        self._carry: _Pending | None = None
        self._expected = 1
        """Requests the last batch held: the collector waits (up to ``batch_wait_ms``) for this many."""
        self.arriving = 0
        """Requests whose handler is reading/validating its body (they will be queued in a moment)."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, queries: list[str], topk: int, return_scores: bool, single: bool = False) -> bytes:
        """Queue one request; resolves to its JSON-encoded body (see :func:`_response_body`)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(queries, topk, return_scores, future, single))
        return await future

    async def _collect(self) -> list[_Pending]:
        first = self._carry or await self.queue.get()
        self._carry = None
        batch, size = [first], len(first.queries)
        deadline = time.perf_counter() + self.cfg.batch_wait_ms / 1000.0
        while size < self.cfg.max_batch_queries:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                if not self.arriving and len(batch) >= self._expected:
                    break  # nobody else is being read and the batch is as large as the last one: do not wait
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if size + len(item.queries) > self.cfg.max_batch_queries:
                self._carry = item  # starts the next batch
                break
            batch.append(item)
            size += len(item.queries)
        # Concurrent clients reply to a batch's responses at about the same time, but not all of them are being read
        # when the collector wakes up on the first; so expect as many requests as the last batch held (a sequential
        # client keeps this at 1: it never waits; 16 clients keep it near 16: batches do not split into 1 + 15).
        self._expected = len(batch)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            start = time.perf_counter()
            try:
                bodies = await loop.run_in_executor(self.executor, self._retrieve, batch)
            except Exception as exc:  # a failed retrieval fails its batch, not the server
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self.metrics.retrieval_seconds += time.perf_counter() - start
                self.metrics.batches += 1
                self.metrics.batch_sizes.append(sum(len(item.queries) for item in batch))
            for item, body in zip(batch, bodies):
                if not item.future.done():  # the client may have gone away
                    item.future.set_result(body)

    def _retrieve(self, batch: list[_Pending]) -> list[bytes]:
        """Worker thread: one retrieval call for the whole batch, then per-request JSON bodies."""
        queries = [q for item in batch for q in item.queries]
        k = max(item.topk for item in batch)
        if isinstance(self.retriever, InProcessRetriever):  # fast path: rows -> JSON dicts, no Hit objects
            rows, scores = self.retriever.search_rows(queries, k)
            docs = self.retriever.docs
            valid = rows >= 0
            ids, contents = docs.fields(rows[valid])
            if docs.has_fields:  # rows with extra fields: the whole row, as stored
                rows_json: Iterable[dict] = (
                    {"id": i, "contents": c, **f} for i, c, f in zip(ids, contents, docs.extra_fields(rows[valid])))
            else:
                rows_json = ({"id": i, "contents": c} for i, c in zip(ids, contents))
            flat = iter(zip(rows_json, scores[valid].tolist()))
            per_query = [list(itertools.islice(flat, n)) for n in valid.sum(axis=1).tolist()]
        else:  # a generic retriever (hybrid, cache, HTTP...) is not promised to be prefix-exact: one call per topk
            per_query = [None] * len(queries)
            positions: dict[int, list[int]] = {}
            offset = 0
            for item in batch:
                positions.setdefault(item.topk, []).extend(range(offset, offset + len(item.queries)))
                offset += len(item.queries)
            for topk, idx in positions.items():
                found = self.retriever.search([queries[i] for i in idx], topk)
                for i, hits in zip(idx, found):
                    per_query[i] = [(h.document.to_json(), h.score) for h in hits]
        bodies, offset = [], 0
        for item in batch:
            chunk = per_query[offset : offset + len(item.queries)]
            offset += len(item.queries)
            bodies.append(_response_body(chunk, item.topk, item.return_scores, item.single, item.queries))
        return bodies


def create_app(retriever: Retriever, cfg: ServerConfig | None = None, info: dict | None = None):
    """The ASGI application serving ``retriever``: :class:`FastRetrieve` in front of a FastAPI app (batching starts
    with the lifespan)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServerConfig()
    metrics = Metrics(cfg.latency_window)
    state: dict[str, MicroBatcher] = {}
    info = dict(info or {})
    documents = len(retriever) if hasattr(retriever, "__len__") else None
    if "fingerprint" not in info:
        try:
            info["fingerprint"] = index_fingerprint(retriever)
        except ValueError:
            pass
    lookup = retriever  # whole documents and pages come from the index itself, never from the cache
    cache_stats = None
    if cfg.cache:
        retriever = CachedRetriever(retriever, cfg.cache, mode=cfg.cache_mode, fingerprint=info.get("fingerprint"))
        cache_stats = retriever.stats
    limits = {"max_queries_per_request": cfg.max_queries_per_request, "max_topk": cfg.max_topk,
              "max_query_chars": cfg.max_query_chars, "max_body_bytes": cfg.max_body_bytes,
              "read_timeout_s": cfg.read_timeout_s, "max_connections": cfg.max_connections}
    drain = _Drain()

    @asynccontextmanager
    async def lifespan(_app):
        batcher = MicroBatcher(retriever, cfg, metrics)
        batcher.start()
        state["batcher"] = batcher
        yield
        await batcher.stop()

    app = FastAPI(title="openrlhf-search retrieval", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.config = cfg

    def error(status: int, message: str) -> JSONResponse:
        if status >= 500:
            metrics.server_errors += 1
        else:
            metrics.client_errors += 1
        headers = {"WWW-Authenticate": 'Bearer realm="openrlhf-search"'} if status == 401 else None
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    def authorized(header: str) -> bool:
        if not cfg.token:
            return True
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), cfg.token.encode())

    def fail(status: int, message: str) -> tuple[int, bytes, list]:
        """``error`` as raw ASGI parts (counted the same way)."""
        response = error(status, message)
        return status, response.body, [(k.encode(), v.encode()) for k, v in response.headers.items()
                                       if k.lower() != "content-length"]

    async def read_body(declared: str | None, chunks) -> bytes:
        """The whole body, within ``max_body_bytes`` and ``read_timeout_s``; a 503 if the server starts shutting
        down before it has arrived."""
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest(400, f"invalid Content-Length header {declared!r}")
            if int(declared) > cfg.max_body_bytes:
                raise BadRequest(413, f"request body of {declared} bytes exceeds max_body_bytes={cfg.max_body_bytes}")
        parts, size = [], 0
        task = asyncio.current_task()
        drain.reading.add(task)
        try:
            async with asyncio.timeout(cfg.read_timeout_s):
                async for chunk in chunks:
                    size += len(chunk)
                    if size > cfg.max_body_bytes:
                        raise BadRequest(413, f"request body exceeds max_body_bytes={cfg.max_body_bytes}")
                    parts.append(chunk)
        except TimeoutError:
            metrics.read_timeouts += 1
            raise BadRequest(408, f"request body not received within read_timeout_s={cfg.read_timeout_s:g} s "
                                  f"({size} bytes arrived)") from None
        except asyncio.CancelledError:
            if not drain.draining:
                raise
            task.uncancel()
            metrics.shutdown_refused += 1
            raise BadRequest(503, "the retrieval server is shutting down; send the request again (to another "
                                  "replica, or once it is back)") from None
        finally:
            drain.reading.discard(task)
        return b"".join(parts)

    async def handle_retrieve(auth: str, declared: str | None, chunks) -> tuple[int, bytes, list]:
        """``POST /retrieve``: ``(status, JSON body, extra headers)``; shared by the raw ASGI path and FastAPI."""
        start = time.perf_counter()
        metrics.requests += 1
        if not authorized(auth):
            return fail(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
        batcher = state["batcher"]
        batcher.arriving += 1
        try:
            request = parse_retrieve_request(await read_body(declared, chunks), cfg)
        except BadRequest as exc:
            return fail(exc.status, exc.message)
        except Exception as exc:  # a malformed body must never be a 5xx
            return fail(400, f"malformed request body: {type(exc).__name__}: {exc}")
        finally:
            batcher.arriving -= 1
        headers = []
        if request.truncated:
            metrics.truncated_queries += request.truncated
            headers.append((b"x-truncated-queries", str(request.truncated).encode()))
        if not request.queries:  # Search-R1's server: an empty batch is an empty result (its clients send one)
            metrics.latencies.append(time.perf_counter() - start)
            return 200, b'{"result":[]}', headers
        try:
            body = await batcher.submit(request.queries, request.topk, request.return_scores, request.single)
        except Exception as exc:
            return fail(500, f"retrieval failed: {type(exc).__name__}: {exc}")
        metrics.queries += len(request.queries)
        metrics.latencies.append(time.perf_counter() - start)
        return 200, body, headers

    async def read_json(request: Request, field: str):
        """The strings in ``field`` of a small JSON body (``/documents``, ``/access``), or a JSON error response."""
        if not authorized(request.headers.get("authorization", "")):
            return error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
        try:
            payload = _decode_json_strictly(await read_body(request.headers.get("content-length"), request.stream()))
        except BadRequest as exc:
            return error(exc.status, exc.message)
        values = payload.get(field) if isinstance(payload, dict) else None
        if not isinstance(values, list) or not all(isinstance(k, str) for k in values):
            return error(422, f"field '{field}' must be a list of strings")
        if len(values) > cfg.max_queries_per_request:
            return error(413, f"{len(values)} {field} exceed max_queries_per_request={cfg.max_queries_per_request}")
        return values

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return error(422, str(exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):  # never a plain-text 500, and always counted
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.post("/retrieve")
    async def retrieve(request: Request):  # reached only when the app is mounted without the fast path
        status, body, headers = await handle_retrieve(request.headers.get("authorization", ""),
                                                      request.headers.get("content-length"), request.stream())
        return Response(body, status_code=status, media_type="application/json",
                        headers={k.decode(): v.decode() for k, v in headers if k.lower() != b"content-type"})

    async def lookup_rows(request: Request, method: str, field: str, what: str, shape):
        """One whole-row lookup endpoint: the strings in ``field`` -> ``lookup.<method>(strings)`` in a thread ->
        ``shape(result)``; 501 when the retriever has no such lookup, 500 naming what failed."""
        getter = getattr(lookup, method, None)
        if getter is None:
            return error(501, f"this retriever ({type(lookup).__name__}) cannot return whole {what}s")
        values = await read_json(request, field)
        if not isinstance(values, list):
            return values
        try:
            return shape(await asyncio.to_thread(getter, values))
        except Exception as exc:
            return error(500, f"{what} lookup failed: {type(exc).__name__}: {exc}")

    @app.post("/documents")
    async def whole_documents(request: Request):
        """Whole documents by id or title (the ``open`` tool): ``{"keys": [...]}`` -> ``{"documents": [...]}``."""
        return await lookup_rows(request, "get_documents", "keys", "document",
                                 lambda docs: {"documents": [None if d is None else d.to_json() for d in docs]})

    @app.post("/access")
    async def access_pages(request: Request):
        """Whole pages by URL (ASearcher's browsing tool): ``{"urls": [...]}`` -> ``{"result": [page | null]}``."""
        return await lookup_rows(request, "get_pages", "urls", "page", lambda pages: {"result": pages})

    @app.get("/health")
    async def health():
        return {"status": "ok", "documents": documents, **info, "limits": limits}

    @app.get("/metrics")
    async def get_metrics(request: Request):
        if not authorized(request.headers.get("authorization", "")):
            return error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
        snap = {**metrics.snapshot(), "config": {k: v for k, v in asdict(cfg).items() if k != "token"}}
        if cache_stats is not None:
            snap["cache"] = cache_stats()
        return snap

    return FastRetrieve(app, handle_retrieve, drain)


class _Drain:
    """Shutdown state shared by the app and the server: requests still being received are refused with a 503."""

    def __init__(self):
        self.draining = False
        self.reading: set[asyncio.Task] = set()
        """Tasks reading a request body right now."""

    def begin(self) -> None:
        """Called in the event loop when the server starts shutting down."""
        self.draining = True
        for task in list(self.reading):
            task.cancel()


class FastRetrieve:
    """ASGI front of the FastAPI app: ``POST /retrieve`` is answered here, everything else by FastAPI.

    Measured (benchmarks/README.md, "where the per-request time goes"): with batch-1 requests FastAPI/Starlette's
    per-request machinery (routing, dependency solving, telemetry context, Request/Response objects) cost more CPU
    than the retrieval of the query itself; this path reads the body from ``receive`` and writes the JSON bytes with
    two ``send`` calls. Attributes (``state``, ``routes``...) are the FastAPI app's.
    """

    def __init__(self, app, handle, drain: _Drain):
        self.app = app
        self._handle = handle
        self.drain = drain

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/retrieve" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        auth, declared = "", None
        for key, value in scope["headers"]:
            if key == b"authorization":
                auth = value.decode("latin-1")
            elif key == b"content-length":
                declared = value.decode("latin-1")

        async def chunks():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        status, body, headers = await self._handle(auth, declared, chunks())
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *[(k, v) for k, v in headers if k.lower() != b"content-type"]]})
        await send({"type": "http.response.body", "body": body})


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON ``{"detail": message}`` body that closes the connection."""
    body = json.dumps({"detail": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def guarded_protocol(cfg: ServerConfig, metrics: Metrics):
    """uvicorn's h11 protocol with the two guards uvicorn does not have: a deadline on receiving a request's headers
    (``read_timeout_s``: a client trickling bytes, or connecting and sending nothing, gets a 408 and is closed) and a
    cap on open connections (``max_connections``: the next one gets a 503 and is closed at once). uvicorn's own
    ``limit_concurrency`` answers 503 only once a request's headers have arrived, so it cannot bound connections
    that never finish them."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    rejected = _raw_response(503, "Service Unavailable", f"too many open connections (max_connections="
                                                         f"{cfg.max_connections}); retry shortly")
    timed_out = _raw_response(408, "Request Timeout", f"request headers not received within read_timeout_s="
                                                      f"{cfg.read_timeout_s:g} s")

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > cfg.max_connections:
                metrics.rejected_connections += 1
                transport.write(rejected)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(cfg.read_timeout_s, self._headers_overdue)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()  # part of a request's headers: the deadline runs from its first byte
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                metrics.read_timeouts += 1
                self.transport.write(timed_out)
                self.transport.close()

    return GuardedH11Protocol


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``(host, port)``; raises ``OSError`` (port in use...) before anything
    is printed or started."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def make_server(app: FastRetrieve, cfg: ServerConfig, metrics: Metrics | None = None, log_level: str = "warning"):
    """A ``uvicorn.Server`` for ``app`` with the guarded protocol, and a shutdown that first refuses (503) the
    requests still being received, so it neither waits out its grace period nor cancels them into tracebacks."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.drain.begin()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_keep_alive=cfg.keep_alive_s, timeout_graceful_shutdown=cfg.shutdown_grace_s,
                            http=guarded_protocol(cfg, metrics or app.state.metrics))
    return _Server(config)


class RetrievalServer:
    """Run :func:`create_app` under uvicorn in a background thread (tests, benchmarks, notebooks).

    ``with RetrievalServer(retriever, ServerConfig(port=0)) as srv: HTTPRetriever(srv.url).search(...)``; the
    socket is bound before the thread starts, so ``srv.port`` is known and there is no free-port race.
    """

    def __init__(self, retriever: Retriever, cfg: ServerConfig | None = None, info: dict | None = None):
        self.cfg = cfg or ServerConfig()
        self.app = create_app(retriever, self.cfg, info)
        self.sock = bind_socket(self.cfg.host, self.cfg.port)
        self.port = self.sock.getsockname()[1]
        self.server = make_server(self.app, self.cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> RetrievalServer:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"retrieval server on {self.url} did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> RetrievalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(retriever: Retriever, cfg: ServerConfig, info: dict | None = None,
                  sock: socket.socket | None = None) -> None:
    """Blocking: serve until interrupted (the ``openrlhf-search serve`` entry point); ``sock``: already bound by
    :func:`bind_socket` (else bound here)."""
    app = create_app(retriever, cfg, info)
    sock = sock or bind_socket(cfg.host, cfg.port)
    try:
        make_server(app, cfg, log_level="info").run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the shutdown is already done
        pass
