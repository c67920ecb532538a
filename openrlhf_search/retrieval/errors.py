"""Typed retrieval failures: what a trainer or an evaluation catches to say "the retriever failed".

Every failure of a retriever that is not the caller's bug derives from :class:`RetrievalError`, so callers test
types, not class names. The built-in ``ConnectionError`` (an in-process or plugin retriever whose socket was refused
or reset) counts as a retrieval failure too. Failures are often re-raised with context (the asynchronous rollout
producer wraps its thread's exception), so :func:`retrieval_failure` walks the ``__cause__``/``__context__`` chain.
"""

from __future__ import annotations


class RetrievalError(RuntimeError):
    """Base of every retrieval failure (a server down, a rejected request, a wrong service)."""


class RetrieverUnavailable(RetrievalError):
    """The retrieval server could not be reached / kept failing (after every retry)."""


class RetrieverRequestError(RetrievalError, ValueError):
    """The server rejected the request (4xx); retrying would not help."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"retrieval server {url} rejected the request with HTTP {status}: {message}")
        self.status = status


class ReplicaMismatch(RetrievalError, ValueError):
    """The replicas given to one client serve different indexes (their ``/health`` fingerprints differ)."""


RETRIEVAL_FAILURES: tuple[type[BaseException], ...] = (RetrievalError, ConnectionError)
"""The exception types that mean "the retriever failed" wherever they are raised from."""


def retrieval_failure(exc: BaseException | None) -> BaseException | None:
    """The first retrieval failure in ``exc``'s chain (itself, its ``__cause__``, its ``__context__``, ...), or
    ``None`` when the chain holds none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, RETRIEVAL_FAILURES):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def is_retrieval_failure(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised while handling, a retrieval failure (see :func:`retrieval_failure`)."""
    return retrieval_failure(exc) is not None
