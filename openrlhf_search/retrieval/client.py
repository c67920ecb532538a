"""HTTP client of one or several Search-R1 ``POST /retrieve`` servers, behind the :class:`Retriever` protocol.

Replicas: ``HTTPRetriever(["http://a:8000", "http://b:8000"])`` (or one comma-separated string) spreads requests
over several servers of the same index (Ray actors started by the OpenRLHF backend, :mod:`.replicas`, or servers
started by hand): each request goes to the live replica with the fewest requests in flight (round-robin among
equals). A replica that fails a request (connection error, timeout, 5xx) is marked down and the same request --
every request of this protocol is a read, so a retry is safe -- goes at once to another live replica (counted as a
*failover*); a downed replica is re-probed with ``GET /health`` when a request arrives ``reprobe_s`` seconds after it
failed, and takes requests again once it answers. :meth:`HTTPRetriever.replica_stats` counts all of it (the trainer
logs it as ``retrieval/failover`` ...). Before its first request the client reads every replica's ``/health`` and
refuses (:class:`ReplicaMismatch`) replicas whose index fingerprints differ: answers would depend on which replica
was asked. One URL is the special case of one replica.

Failure policy, chosen for RL rollouts (a long run should survive a server restart, and must not hammer a server
that rejects its input):

* connection errors, timeouts and 5xx responses are retried on the other replicas first; when every replica has
  failed the request, the whole round is retried ``retries`` times with exponential backoff (``backoff *
  2**attempt`` seconds, capped at ``max_backoff``, with +-25% jitter so that many rollout workers do not retry in
  lock-step); after the last round :class:`RetrieverUnavailable` names every URL with its last error -- the trainer
  catches it;
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

import contextvars
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import jsonfast
from .errors import ReplicaMismatch, RetrieverRequestError, RetrieverUnavailable
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
    reprobe_s: float = 5.0
    """A replica marked down is re-probed (``GET /health``) by the first request arriving this many seconds after
    it failed (and again every ``reprobe_s`` while it stays down)."""
    probe_timeout: float = 2.0
    """Seconds a re-probe may take (capped by :attr:`timeout`): a dead node must not stall a request for long."""


_JSON = {"Content-Type": "application/json"}


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url[: -len("/retrieve")] if url.endswith("/retrieve") else url


def parse_urls(spec: str | Sequence[str]) -> list[str]:
    """The replica base URLs of ``spec``: one URL, a comma-separated string of URLs, or a list of them (each may end
    in ``/retrieve``); duplicates dropped, order kept. Raises ``ValueError`` naming an entry that is not
    ``http(s)://``."""
    items = spec.split(",") if isinstance(spec, str) else [str(u) for u in spec]
    urls = list(dict.fromkeys(_base_url(u) for u in items if u.strip()))
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad or not urls:
        raise ValueError(f"retrieval URLs {spec!r}: expected http(s)://host:port entries (comma-separated or a "
                         f"list), got {bad[0]!r}" if bad else f"retrieval URLs {spec!r}: no URL given")
    return urls


CALL_STATS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("openrlhf_search_retrieval_call_stats",
                                                                          default=None)
"""When set to a dict, every client call made in this context adds its ``failovers`` and ``replica_errors`` to it
(the OpenRLHF agent sets one per trajectory, so each trajectory logs the failovers of its own searches)."""


@dataclass
class Replica:
    """One server of an :class:`HTTPRetriever`'s pool and what the client knows about it."""

    url: str
    client: object = None
    """Its pooled ``httpx.Client``."""
    up: bool = True
    in_flight: int = 0
    retry_at: float = 0.0
    """``time.monotonic()`` after which a downed replica is re-probed."""
    last_error: str = ""
    errors: int = 0
    """Requests that failed on it (connection error, timeout, 5xx)."""
    answered: int = 0
    """Requests it answered."""


@dataclass
class _Stats:
    requests: int = 0
    failovers: int = 0
    replica_errors: int = 0
    marked_down: int = 0
    recovered: int = 0


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

    ``url``: one base URL, several (a list, or one comma-separated string: replicas of the same index, see the
    module docstring), each may end in ``/retrieve``. Thread-safe (one pooled ``httpx.Client`` per replica).
    """

    def __init__(self, url: str | Sequence[str], timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 token: str | None = None, max_backoff: float = 10.0, max_queries_per_request: int | None = None,
                 reprobe_s: float = 5.0, probe_timeout: float = 2.0):
        import httpx

        if retries < 0 or timeout <= 0 or backoff < 0 or reprobe_s < 0 or probe_timeout <= 0:
            raise ValueError(f"need retries >= 0, timeout > 0, backoff >= 0, reprobe_s >= 0, probe_timeout > 0; got "
                             f"{retries}, {timeout}, {backoff}, {reprobe_s}, {probe_timeout}")
        urls = parse_urls(url)
        self.urls = urls
        self.url = urls[0] if len(urls) == 1 else ",".join(urls)
        self.config = ClientConfig(timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff,
                                   reprobe_s=reprobe_s, probe_timeout=probe_timeout)
        token = resolve_token(token)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.replicas = [Replica(u, httpx.Client(base_url=u, timeout=timeout, headers=self._headers)) for u in urls]
        self._lock = threading.Lock()
        self._next = 0  # round-robin position
        self._stats = _Stats()
        self._limits: dict | None = None
        self._explicit_limits = max_queries_per_request is not None
        if self._explicit_limits:
            self._limits = {"max_queries_per_request": int(max_queries_per_request)}
        self._health: dict | None = None
        self._verified = len(self.replicas) == 1

    def _delay(self, attempt: int) -> float:
        base = min(self.config.backoff * (2**attempt), self.config.max_backoff)
        return base * random.uniform(0.75, 1.25)

    # -- replica choice and health ---------------------------------------------------------------------------------

    def _due(self, tried: set[str]) -> list[Replica]:
        """Downed replicas whose re-probe time has come (claimed: another thread will not probe them too)."""
        now = time.monotonic()
        with self._lock:
            due = [r for r in self.replicas if not r.up and r.url not in tried and r.retry_at <= now]
            for r in due:
                r.retry_at = now + self.config.reprobe_s
        return due

    def _pick(self, tried: set[str], everyone: bool) -> Replica | None:
        """The untried replica to send to: the live one with the fewest requests in flight (round-robin among
        equals); with ``everyone`` (a later round, or no replica is up) downed ones are candidates too."""
        with self._lock:
            n = len(self.replicas)
            order = [self.replicas[(self._next + i) % n] for i in range(n)]
            live = [r for r in order if r.url not in tried and r.up]
            if not live and (everyone or not any(r.up for r in self.replicas)):
                live = [r for r in order if r.url not in tried]
            if not live:
                return None
            choice = min(live, key=lambda r: r.in_flight)  # min keeps the first of equals: the round-robin order
            self._next = (self.replicas.index(choice) + 1) % n
            choice.in_flight += 1
            return choice

    def _probe(self, replica: Replica) -> bool:
        """``GET /health`` of a downed replica (short timeout); marks it up when it answers 200."""
        import httpx

        try:
            ok = replica.client.get("/health", timeout=min(self.config.timeout, self.config.probe_timeout)).is_success
        except httpx.TransportError:
            ok = False
        if ok:
            self._mark_up(replica)
        return ok

    def _mark_up(self, replica: Replica) -> None:
        with self._lock:
            if not replica.up:
                replica.up = True
                self._stats.recovered += 1
                left = sum(r.up for r in self.replicas)
            else:
                return
        print(f"[openrlhf-search] retrieval replica {replica.url} answers again ({left} of {len(self.replicas)} up)",
              file=sys.stderr, flush=True)

    def _failed(self, replica: Replica, reason: str) -> None:
        """Book a failed request on ``replica`` and mark it down (re-probed after ``reprobe_s``)."""
        with self._lock:
            replica.in_flight -= 1
            replica.errors += 1
            replica.last_error = reason
            replica.retry_at = time.monotonic() + self.config.reprobe_s
            self._stats.replica_errors += 1
            was_up, replica.up = replica.up, False
            if was_up:
                self._stats.marked_down += 1
            left = sum(r.up for r in self.replicas)
        stats = CALL_STATS.get()
        if stats is not None:
            stats["replica_errors"] = stats.get("replica_errors", 0) + 1
        if was_up and len(self.replicas) > 1:
            print(f"[openrlhf-search] retrieval replica {replica.url} marked down ({reason}); {left} of "
                  f"{len(self.replicas)} up", file=sys.stderr, flush=True)

    def _answered(self, replica: Replica, failed_elsewhere: bool) -> None:
        with self._lock:
            replica.in_flight -= 1
            replica.answered += 1
            self._stats.requests += 1
            if failed_elsewhere:
                self._stats.failovers += 1
            was_up, replica.up = replica.up, True
            if not was_up:
                self._stats.recovered += 1
        stats = CALL_STATS.get()
        if stats is not None and failed_elsewhere:
            stats["failovers"] = stats.get("failovers", 0) + 1

    def _released(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def replica_stats(self) -> dict[str, int]:
        """Counters since this client was built: ``replicas``, ``replicas_up``, ``requests`` (answered),
        ``failovers`` (requests answered by a replica after another one failed them), ``replica_errors`` (failed
        attempts), ``marked_down`` and ``recovered`` (replica state changes)."""
        with self._lock:
            s = self._stats
            return {"replicas": len(self.replicas), "replicas_up": sum(r.up for r in self.replicas),
                    "requests": s.requests, "failovers": s.failovers, "replica_errors": s.replica_errors,
                    "marked_down": s.marked_down, "recovered": s.recovered}

    def check_replicas(self) -> dict[str, bool]:
        """Probe every replica now (``GET /health``); ``{url: up}``. A replica that does not answer is marked
        down, one that does is marked up."""
        import httpx

        out = {}
        for r in self.replicas:
            try:
                ok = r.client.get("/health", timeout=min(self.config.timeout, self.config.probe_timeout)).is_success
            except httpx.TransportError as exc:
                ok, reason = False, f"{type(exc).__name__}: {exc}"
            else:
                reason = "GET /health failed"
            if ok:
                self._mark_up(r)
            elif r.up:
                with self._lock:
                    r.in_flight += 1  # _failed releases it
                self._failed(r, reason)
            out[r.url] = ok
        return out

    def _verify(self) -> None:
        """Once, before the first request: the fingerprints of the replicas that answer ``/health`` must agree."""
        import httpx

        if self._verified:
            return
        self._verified = True
        seen: dict[str, str] = {}
        for r in self.replicas:
            try:
                response = r.client.get("/health", timeout=min(self.config.timeout, self.config.probe_timeout))
                fp = response.json().get("fingerprint") if response.is_success else None
            except (httpx.TransportError, ValueError, AttributeError):  # down, or no JSON /health: not comparable
                continue
            if fp:
                seen[r.url] = str(fp)
        if len(set(seen.values())) > 1:
            each = ", ".join(f"{u}: {fp}" for u, fp in seen.items())
            raise ReplicaMismatch(f"retrieval replicas serve different indexes (fingerprints {each}); every replica "
                                  "of one client must serve the same index")

    # -- one request, over the replicas ----------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs):
        """One idempotent request, answered by some replica (see the module docstring for the policy)."""
        import httpx

        rounds = self.config.retries + 1
        failures: dict[str, str] = {}
        for rnd in range(rounds):
            tried: set[str] = set()
            for r in self._due(tried):
                self._probe(r)
            while (replica := self._pick(tried, everyone=rnd > 0)) is not None:
                tried.add(replica.url)
                try:
                    response = replica.client.request(method, path, **kwargs)
                except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                    reason = f"{type(exc).__name__}: {exc}"
                except BaseException:
                    self._released(replica)
                    raise
                else:
                    try:
                        ok, reason = self._outcome(path, response, replica)
                    except BaseException:
                        self._released(replica)
                        raise
                    if ok is not None:
                        self._answered(replica, failed_elsewhere=any(u != replica.url for u in failures))
                        return ok
                self._failed(replica, reason)
                failures[replica.url] = reason
            if rnd + 1 < rounds:
                time.sleep(self._delay(rnd))
        raise self._unavailable(path, rounds, failures)

    def _outcome(self, path: str, response, replica: Replica | None = None) -> tuple[object, str]:
        """``(response, "")`` on success, ``(None, reason)`` for a retryable failure; raises on a 4xx."""
        if response.status_code < 400:
            return response, ""
        try:
            message = response.json().get("detail", response.text)
        except ValueError:
            message = response.text[:500]
        if response.status_code < 500:
            url = replica.url if replica is not None else self.url
            raise RetrieverRequestError(url + path, response.status_code, str(message))
        return None, f"HTTP {response.status_code}: {message}"

    def _unavailable(self, path: str, rounds: int, failures: dict[str, str]) -> RetrieverUnavailable:
        if len(self.replicas) == 1:
            return RetrieverUnavailable(f"retrieval server {self.url}{path} unavailable after {rounds} attempt(s) "
                                        f"(timeout {self.config.timeout} s): {failures.get(self.url, '')}")
        each = "; ".join(f"{u}{path}: {failures.get(u, 'not tried')}" for u in self.urls)
        return RetrieverUnavailable(f"no retrieval replica left: all {len(self.replicas)} replicas failed {path} "
                                    f"in each of {rounds} round(s) (timeout {self.config.timeout} s): {each}")

    @staticmethod
    def _payload(queries: list[str], topk: int) -> bytes:
        _check_queries(queries)
        return jsonfast.dumps({"queries": list(queries), "topk": int(topk), "return_scores": True})

    def _hits(self, response, n_queries: int) -> list[list[Hit]]:
        url = str(response.url).rsplit("/retrieve", 1)[0] if getattr(response, "url", None) else self.url
        try:
            payload = jsonfast.loads(response.content)
        except ValueError:
            raise RetrieverUnavailable(f"retrieval server {url}/retrieve returned non-JSON: "
                                       f"{response.text[:200]!r}") from None
        return parse_result(url, payload, n_queries)

    def limits(self) -> dict:
        """The servers' advertised request limits (``/health`` ``limits`` of the first replica that answers; ``{}``
        if it advertises none)."""
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
        """``Retriever.search`` over HTTP: one ``POST /retrieve`` per chunk of the server's size (usually one),
        each answered by some replica."""
        _check_queries(queries)
        if not queries:
            return []
        self._verify()
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
        """``search`` for asyncio callers (e.g. OpenRLHF's async agent ``step``): same replicas and retries,
        non-blocking."""
        import asyncio

        import httpx

        _check_queries(queries)
        if not queries:
            return []
        await asyncio.to_thread(self._verify)
        queries = list(queries)
        spans = await asyncio.to_thread(self.chunks, queries)
        out: list[list[Hit]] = []
        async with httpx.AsyncClient(timeout=self.config.timeout, headers=self._headers) as client:
            for start, end in spans:
                part = queries[start:end]
                out.extend(await self._apost(client, self._payload(part, topk), len(part)))
        return out

    async def _apost(self, client, body: bytes, n: int) -> list[list[Hit]]:
        import asyncio

        import httpx

        rounds = self.config.retries + 1
        failures: dict[str, str] = {}
        for rnd in range(rounds):
            tried: set[str] = set()
            for r in self._due(tried):
                await asyncio.to_thread(self._probe, r)
            while (replica := self._pick(tried, everyone=rnd > 0)) is not None:
                tried.add(replica.url)
                try:
                    response = await client.post(replica.url + "/retrieve", content=body, headers=_JSON)
                except httpx.TransportError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                except BaseException:  # cancelled, or not a transport failure
                    self._released(replica)
                    raise
                else:
                    try:
                        ok, reason = self._outcome("/retrieve", response, replica)
                    except BaseException:
                        self._released(replica)
                        raise
                    if ok is not None:
                        self._answered(replica, failed_elsewhere=any(u != replica.url for u in failures))
                        return self._hits(ok, n)
                self._failed(replica, reason)
                failures[replica.url] = reason
            if rnd + 1 < rounds:
                await asyncio.sleep(self._delay(rnd))
        raise self._unavailable("/retrieve", rounds, failures)

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
        self._verify()
        body = jsonfast.dumps({"keys": [str(k) for k in ids_or_titles]})
        payload = self._request("POST", "/documents", content=body, headers=_JSON).json()
        docs = payload.get("documents") if isinstance(payload, dict) else None
        if not isinstance(docs, list) or len(docs) != len(ids_or_titles):
            raise RetrieverUnavailable(f"retrieval server {self.url}/documents answered {str(payload)[:200]!r} for "
                                       f"{len(ids_or_titles)} keys")
        return [None if d is None else Document.from_json(d) for d in docs]

    def health(self) -> dict:
        """``GET /health`` of some live replica (with the same retry policy)."""
        self._health = self._request("GET", "/health").json()
        return self._health

    def _cached_health(self) -> dict:
        return self._health if self._health is not None else self.health()

    def close(self) -> None:
        for r in self.replicas:
            r.client.close()

    def __enter__(self) -> HTTPRetriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HTTPRetriever({self.url!r}, timeout={self.config.timeout}, retries={self.config.retries})"
