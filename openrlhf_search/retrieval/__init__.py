"""Retrieval: corpus readers, BM25 / dense / hybrid indexes, the Search-R1-compatible server and its client.

Everything the environment needs is the :class:`~openrlhf_search.retrieval.types.Retriever` protocol and
:func:`load_retriever`::

    retriever = load_retriever("indexes/wiki-bm25")          # in-process, from an index directory
    retriever = load_retriever("http://127.0.0.1:8000")      # a running `openrlhf-search serve`
    hits = retriever.search(["who wrote hamlet"], topk=3)    # -> [[Hit(document, score), ...]]

The index classes resolve on first attribute access, so ``import openrlhf_search.retrieval`` pulls in neither
bm25s, faiss, sentence-transformers, FastAPI nor httpx (numpy only, for the index integrity check).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from openrlhf_search.registry import did_you_mean

from .cache import with_cache
from .client import HTTPRetriever
from .integrity import check_index
from .manifest import LOADERS, Manifest
from .types import Document, Hit, Retriever

# public name -> submodule defining it (resolved on first attribute access)
_LAZY: dict[str, str] = {
    "read_corpus": "corpus",
    "write_corpus_jsonl": "corpus",
    "CorpusError": "corpus",
    "CorpusReader": "corpus",
    "DocStore": "docstore",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    "InProcessRetriever": "inprocess",
    "BM25Config": "bm25",
    "BM25Index": "bm25",
    "BM25Retriever": "bm25",
    "DenseConfig": "dense",
    "DenseIndex": "dense",
    "DenseRetriever": "dense",
    "HybridRetriever": "hybrid",
    "reciprocal_rank_fusion": "hybrid",
    "CachedRetriever": "cache",
    "RetrievalCache": "cache",
    "CacheMiss": "cache",
    "IndexIntegrityError": "integrity",
    "check_index": "integrity",
    "retrieval_metrics": "metrics",
    "HTTPRetriever": "client",
    "RetrievalError": "errors",
    "RetrieverUnavailable": "errors",
    "RetrieverRequestError": "errors",
    "ReplicaMismatch": "errors",
}

__all__ = ["Document", "Hit", "Retriever", "LOADERS", "load_retriever", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(target: str | Callable) -> Callable:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def load_retriever(spec: str | os.PathLike | list[str] | Retriever | None, *, token: str | None = None,
                   cache: str | os.PathLike | None = None, cache_mode: str = "record", **kwargs) -> Retriever:
    """Build a :class:`Retriever` from a spec (the one entry point of the trainer, eval and the OpenRLHF agent).

    Args:
        spec: an index directory written by ``openrlhf-search index`` (its ``manifest.json`` names the method; every
            index file is checked first, :func:`~openrlhf_search.retrieval.integrity.check_index`), an
            ``http(s)://host:port`` URL of ``openrlhf-search serve`` (-> :class:`HTTPRetriever`; several URLs --
            replicas of one index -- as a list or one comma-separated string), an object that
            already is a retriever (returned unchanged unless ``cache`` is given), or ``None`` with a ``replay``
            cache (answers only from the recording).
        token: bearer token of an HTTP server; ``None`` -> ``$OPENRLHF_SEARCH_RETRIEVER_TOKEN`` (ignored for
            in-process indexes).
        cache: path of a record/replay cache (:mod:`openrlhf_search.retrieval.cache`); ``None``: no cache.
        cache_mode: ``record``, ``replay`` or ``reuse``.
        **kwargs: forwarded to the loader (e.g. ``n_threads`` for BM25, ``timeout``/``retries`` for HTTP).

    Raises:
        ValueError: the spec is neither a URL nor a directory with a manifest; the manifest's method is unknown;
            :class:`~openrlhf_search.retrieval.integrity.IndexIntegrityError` (a ``ValueError``): a damaged index.
    """
    if spec is None or (isinstance(spec, str) and not spec and cache_mode == "replay"):
        if not cache or cache_mode != "replay":
            raise ValueError("load_retriever: no spec; only a replay cache (cache=..., cache_mode='replay') "
                             "can answer without a retriever")
        return with_cache(None, cache, cache_mode)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(u, str) for u in spec):
        return with_cache(HTTPRetriever(list(spec), token=token, **kwargs), cache, cache_mode)
    if not isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, Retriever):
            return with_cache(spec, cache, cache_mode)
        raise TypeError(f"load_retriever: expected a path, a URL or a Retriever, got {type(spec).__name__}")
    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        return with_cache(HTTPRetriever(text, token=token, **kwargs), cache, cache_mode)

    directory = Path(text)
    if not directory.is_dir():
        raise ValueError(f"load_retriever: {text!r} is neither an http(s):// URL nor an index directory")
    check_index(directory)
    method = Manifest.load(directory).method
    if method not in LOADERS:
        raise ValueError(f"{directory}: unknown index method {method!r}{did_you_mean(str(method), LOADERS)}; known: "
                         f"{LOADERS.names()} (a plugin adds a kind to openrlhf_search.retrieval.LOADERS)")
    return with_cache(_resolve(LOADERS.get(method))(directory, **kwargs), cache, cache_mode)
