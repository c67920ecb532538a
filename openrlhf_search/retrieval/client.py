"""HTTP client of a Search-R1 ``POST /retrieve`` server, behind the :class:`Retriever` protocol.

Failure policy, chosen for RL rollouts (a long run should survive a server restart, and must not hammer a server
that rejects its input):

* connection errors, timeouts and 5xx responses are retried ``retries`` times with exponential backoff
  (``backoff * 2**attempt`` seconds, capped at ``max_backoff``, with +-25% jitter so that many rollout workers do not
  retry in lock-step); after the last attempt :class:`RetrieverUnavailable` names the URL, the attempts and the
  last error -- the trainer catches it;
* 4xx responses are the caller's bug: :class:`RetrieverRequestError` at once, with the server's message;
* a 200 whose body does not have the protocol's shape is :class:`RetrieverUnavailable` (a wrong service).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from . import jsonfast
from .types import Hit


class RetrieverUnavailable(RuntimeError):
    """The retrieval server could not be reached / kept failing (after every retry)."""


class RetrieverRequestError(ValueError):
    """The server rejected the request (4xx); retrying would not help."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"retrieval server {url} rejected the request with HTTP {status}: {message}")
        self.status = status


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


class HTTPRetriever:
    """A :class:`Retriever` that calls ``openrlhf-search serve`` (or Search-R1's own server) over HTTP.

    Thread-safe (one pooled ``httpx.Client``). ``url`` may be the base URL or end in ``/retrieve``.
    """

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 token: str | None = None, max_backoff: float = 10.0):
        import httpx

        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"need retries >= 0, timeout > 0, backoff >= 0; got {retries}, {timeout}, {backoff}")
        self.url = _base_url(url)
        self.config = ClientConfig(timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=self._headers)

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
        if isinstance(queries, str):
            raise TypeError("search() takes a list of query strings, not a single string")
        return jsonfast.dumps({"queries": list(queries), "topk": int(topk), "return_scores": True})

    def _hits(self, response, n_queries: int) -> list[list[Hit]]:
        try:
            payload = jsonfast.loads(response.content)
        except ValueError:
            raise RetrieverUnavailable(f"retrieval server {self.url}/retrieve returned non-JSON: "
                                       f"{response.text[:200]!r}") from None
        return parse_result(self.url, payload, n_queries)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        """``Retriever.search`` over HTTP: one ``POST /retrieve`` for the whole batch."""
        body = self._payload(queries, topk)
        if not queries:
            return []
        response = self._request("POST", "/retrieve", content=body, headers=_JSON)
        return self._hits(response, len(queries))

    async def asearch(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        """``search`` for asyncio callers (e.g. OpenRLHF's async agent ``step``): same retries, non-blocking."""
        import asyncio

        import httpx

        body = self._payload(queries, topk)
        if not queries:
            return []
        attempts, last = self.config.retries + 1, ""
        async with httpx.AsyncClient(base_url=self.url, timeout=self.config.timeout, headers=self._headers) as client:
            for attempt in range(attempts):
                try:
                    response = await client.post("/retrieve", content=body, headers=_JSON)
                except httpx.TransportError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                else:
                    ok, last = self._outcome("/retrieve", response)
                    if ok is not None:
                        return self._hits(ok, len(queries))
                if attempt + 1 < attempts:
                    await asyncio.sleep(self._delay(attempt))
        raise self._unavailable("/retrieve", attempts, last)

    def health(self) -> dict:
        """``GET /health`` (with the same retry policy)."""
        return self._request("GET", "/health").json()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPRetriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPRetriever({self.url!r}, timeout={self.config.timeout}, retries={self.config.retries})"
