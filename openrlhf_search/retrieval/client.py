"""HTTP client of a Search-R1 ``POST /retrieve`` server, behind the :class:`Retriever` protocol.

Failure policy, chosen for RL rollouts (a long run should survive a server restart, and must not hammer a server
that rejects its input):

* connection errors, timeouts and 5xx responses are retried ``retries`` times with exponential backoff
  (``backoff * 2**attempt`` seconds, capped at ``max_backoff``, with +-25% jitter so that many rollout workers do not
  retry in lock-step); after the last attempt :class:`RetrieverUnavailable` names the URL, the attempts and the
  last error -- the trainer catches it;
* 4xx responses are the caller's bug: :class:`RetrieverRequestError` at once, with the server's message;
* a 200 whose body does not have the protocol's shape is :class:`RetrieverUnavailable` (a wrong service).

Large batches: before its first search the client reads the server's advertised limits from ``GET /health``
(``limits.max_queries_per_request`` / ``max_body_bytes``; a server without them -- e.g. Search-R1's own, which has
no ``/health`` -- is sent whole batches) and splits any larger batch into consecutive chunks, reassembled in order,
so a batch that in-process retrieval accepts is accepted over HTTP too. A 413 (a server restarted with lower
limits) makes ``search`` re-read the limits once and re-split the rest of the batch.

Token: ``token=`` or, when it is not given, the environment variable ``OPENRLHF_SEARCH_RETRIEVER_TOKEN`` (the
variable the server reads too; the older ``OPENRLHF_SEARCH_TOKEN`` is read after it), sent as
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

from . import jsonfast
from .errors import RetrieverRequestError, RetrieverUnavailable
from .types import Document, Hit

TOKEN_ENV = "OPENRLHF_SEARCH_RETRIEVER_TOKEN"
"""The environment variable holding the retrieval server's bearer token (read by the server and this client)."""
LEGACY_TOKEN_ENV = "OPENRLHF_SEARCH_TOKEN"
"""The older name, still read everywhere (server and client) after :data:`TOKEN_ENV`, so a variable set as older
docs said does not lock our own client out."""


def resolve_token(token: str | None = None) -> str | None:
    """``token`` if given (``""`` means none), else ``$OPENRLHF_SEARCH_RETRIEVER_TOKEN``, else
    ``$OPENRLHF_SEARCH_TOKEN``, else ``None``."""
    if token is None:
        token = os.environ.get(TOKEN_ENV) or os.environ.get(LEGACY_TOKEN_ENV)
    return token or None


@dataclass
class ClientConfig:
    """Timeouts and retry policy of :class:`HTTPRetriever`."""

    timeout: float = 30.0
    """Seconds per attempt (connect, read and write each)."""
    retries: int = 3
    """Extra attempts after the first one on connection errors, timeouts and 5xx."""
    backoff: float = 0.5
    """Base delay in seconds: attempt ``i`` (0-based) waits ``backoff * 2**i`` before retrying."""
    max_backoff: float = 10.0
    """Upper bound on one delay."""


_JSON = {"Content-Type": "application/json"}


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/retrieve")] if url.endswith("/retrieve") else url


def parse_result(url: str, payload: object, n_queries: int) -> list[list[Hit]]:
    """Hits from a ``{"result": [[...], ...]}`` body (hits with or without scores)."""
    result = payload.get("result") if isinstance(payload, dict) else None
    if not isinstance(result, list) or len(result) != n_queries:
        got = f"{len(result)} result lists" if isinstance(result, list) else repr(payload)[:200]
        raise RetrieverUnavailable(f"retrieval server {url} answered {got} for {n_queries} queries; "
                                   "is it a Search-R1 /retrieve server?")
    try:
        return [[Hit.from_json(h) for h in hits] for hits in result]
    except (AttributeError, TypeError, ValueError) as exc:
        raise RetrieverUnavailable(f"retrieval server {url} returned malformed hits: {exc}") from None


def _check_queries(queries) -> None:
    if isinstance(queries, str):
        raise TypeError("search() takes a list of query strings, not a single string")


class HTTPRetriever:
    """A :class:`Retriever` that calls ``openrlhf-search serve`` (or Search-R1's own server) over HTTP.

    Thread-safe (one pooled ``httpx.Client``). ``url`` may be the base URL or end in ``/retrieve``.
    """

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 token: str | None = None, max_backoff: float = 10.0, max_queries_per_request: int | None = None):
        import httpx

        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"need retries >= 0, timeout > 0, backoff >= 0; got {retries}, {timeout}, {backoff}")
        self.url = _base_url(url)
        self.config = ClientConfig(timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff)
        token = resolve_token(token)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=self._headers)
        self._limits: dict | None = None
        self._explicit_limits = max_queries_per_request is not None
        if self._explicit_limits:
            self._limits = {"max_queries_per_request": int(max_queries_per_request)}
        self._health: dict | None = None

    def _delay(self, attempt: int) -> float:
        base = min(self.config.backoff * (2**attempt), self.config.max_backoff)
        return base * random.uniform(0.75, 1.25)

    def _request(self, method: str, path: str, **kwargs):
        import httpx

        attempts = self.config.retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                last = f"{type(exc).__name__}: {exc}"
            else:
                ok, last = self._outcome(path, response)
                if ok is not None:
                    return ok
            if attempt + 1 < attempts:
                time.sleep(self._delay(attempt))
        raise self._unavailable(path, attempts, last)

    def _outcome(self, path: str, response) -> tuple[object, str]:
        """``(response, "")`` on success, ``(None, reason)`` for a retryable failure; raises on a 4xx."""
        if response.status_code < 400:
            return response, ""
        try:
            message = response.json().get("detail", response.text)
        except ValueError:
            message = response.text[:500]
        if response.status_code < 500:
            raise RetrieverRequestError(self.url + path, response.status_code, str(message))
        return None, f"HTTP {response.status_code}: {message}"

    def _unavailable(self, path: str, attempts: int, last: str) -> RetrieverUnavailable:
        return RetrieverUnavailable(f"retrieval server {self.url}{path} unavailable after {attempts} attempt(s) "
                                    f"(timeout {self.config.timeout} s): {last}")

    @staticmethod
    def _payload(queries: list[str], topk: int) -> bytes:
        _check_queries(queries)
        return jsonfast.dumps({"queries": list(queries), "topk": int(topk), "return_scores": True})

    def _hits(self, response, n_queries: int) -> list[list[Hit]]:
        try:
            payload = jsonfast.loads(response.content)
        except ValueError:
            raise RetrieverUnavailable(f"retrieval server {self.url}/retrieve returned non-JSON: "
                                       f"{response.text[:200]!r}") from None
        return parse_result(self.url, payload, n_queries)

    def limits(self) -> dict:
        """The server's advertised request limits (``/health`` ``limits``; ``{}`` if it advertises none)."""
        if self._limits is None:
            try:
                health = self._cached_health()
            except (RetrieverRequestError, ValueError):  # Search-R1's server has no /health: no advertised limits
                health = {}
            limits = health.get("limits") if isinstance(health, dict) else None
            self._limits = dict(limits) if isinstance(limits, dict) else {}
        return self._limits

    def chunks(self, queries: list[str]) -> list[tuple[int, int]]:
        """``[start, end)`` slices of ``queries`` that each fit the server's query-count and body-size limits."""
        limits = self.limits() if queries else {}
        max_n = int(limits.get("max_queries_per_request") or len(queries) or 1)
        max_bytes = int(limits.get("max_body_bytes") or 0)
        out, start, size = [], 0, 64  # 64: the JSON envelope and topk/return_scores fields
        for i, q in enumerate(queries):
            cost = len(jsonfast.dumps(q)) + 1 if max_bytes else 0  # the query's exact JSON size and its comma
            if i > start and (i - start >= max_n or (max_bytes and size + cost > max_bytes)):
                out.append((start, i))
                start, size = i, 64
            size += cost
        if start < len(queries):
            out.append((start, len(queries)))
        return out

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        """``Retriever.search`` over HTTP: one ``POST /retrieve`` per chunk of the server's size (usually one)."""
        _check_queries(queries)
        if not queries:
            return []
        queries = list(queries)
        out: list[list[Hit]] = []
        refreshed = False
        while len(out) < len(queries):
            rest = queries[len(out) :]
            for start, end in self.chunks(rest):
                part = rest[start:end]
                try:
                    response = self._request("POST", "/retrieve", content=self._payload(part, topk), headers=_JSON)
                except RetrieverRequestError as exc:
                    if exc.status != 413 or refreshed or self._explicit_limits:
                        raise
                    refreshed = True  # the server may have restarted with lower limits: re-read them once
                    self._limits = self._health = None
                    break
                out.extend(self._hits(response, len(part)))
        return out

    async def asearch(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        """``search`` for asyncio callers (e.g. OpenRLHF's async agent ``step``): same retries, non-blocking."""
        import asyncio

        import httpx

        _check_queries(queries)
        if not queries:
            return []
        queries = list(queries)
        spans = await asyncio.to_thread(self.chunks, queries)
        out: list[list[Hit]] = []
        async with httpx.AsyncClient(base_url=self.url, timeout=self.config.timeout, headers=self._headers) as client:
            for start, end in spans:
                part = queries[start:end]
                out.extend(await self._apost(client, self._payload(part, topk), len(part)))
        return out

    async def _apost(self, client, body: bytes, n: int) -> list[list[Hit]]:
        import asyncio

        import httpx

        attempts, last = self.config.retries + 1, ""
        for attempt in range(attempts):
            try:
                response = await client.post("/retrieve", content=body, headers=_JSON)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                ok, last = self._outcome("/retrieve", response)
                if ok is not None:
                    return self._hits(ok, n)
            if attempt + 1 < attempts:
                await asyncio.sleep(self._delay(attempt))
        raise self._unavailable("/retrieve", attempts, last)

    @property
    def fingerprint(self) -> str:
        """The served index's fingerprint (``/health``), else ``http:<url>`` (keys the record/replay cache)."""
        try:
            health = self._cached_health()
        except (RetrieverRequestError, ValueError):
            health = {}
        fp = health.get("fingerprint") if isinstance(health, dict) else None
        return str(fp) if fp else f"http:{self.url}"

    def get_documents(self, ids_or_titles: list[str]) -> list[Document | None]:
        """Whole documents by id or title (the ``open`` tool): one ``POST /documents`` for the batch; ``None``
        where the server's corpus has no match (same rules as ``InProcessRetriever.get_documents``)."""
        if isinstance(ids_or_titles, str):
            raise TypeError("get_documents() takes a list of ids or titles, not a single string")
        if not ids_or_titles:
            return []
        body = jsonfast.dumps({"keys": [str(k) for k in ids_or_titles]})
        payload = self._request("POST", "/documents", content=body, headers=_JSON).json()
        docs = payload.get("documents") if isinstance(payload, dict) else None
        if not isinstance(docs, list) or len(docs) != len(ids_or_titles):
            raise RetrieverUnavailable(f"retrieval server {self.url}/documents answered {str(payload)[:200]!r} for "
                                       f"{len(ids_or_titles)} keys")
        return [None if d is None else Document.from_json(d) for d in docs]

    def health(self) -> dict:
        """``GET /health`` (with the same retry policy)."""
        self._health = self._request("GET", "/health").json()
        return self._health

    def _cached_health(self) -> dict:
        return self._health if self._health is not None else self.health()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPRetriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPRetriever({self.url!r}, timeout={self.config.timeout}, retries={self.config.retries})"
