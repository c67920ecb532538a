"""The ``retriever`` section of the training config: where search queries go (index directory or server URL, cache).

Declared here, next to the retrievers it selects (:func:`openrlhf_search.retrieval.load_retriever`), and registered in
:data:`openrlhf_search.config.SECTIONS`; :class:`openrlhf_search.trainer.config.TrainConfig` embeds it. Imports only
the leaf ``config`` package.
"""

from __future__ import annotations

from dataclasses import dataclass

from openrlhf_search.config import section


@section("retriever")
@dataclass
class RetrieverConfig:
    """Where search queries go."""

    spec: str = ""
    """Index directory or ``http://host:port`` of a retrieval server; empty = build a BM25 index over the
    synthetic corpus into ``<output_dir>/index``."""
    timeout: float = 60.0
    """Seconds before one HTTP retrieval request fails (HTTP retrievers; the OpenRLHF agent too)."""
    token: str | None = None
    """Bearer token of a retrieval server; ``None``: ``$OPENRLHF_SEARCH_RETRIEVER_TOKEN`` (keeps it out of files)."""
    cache: str = ""
    """Record/replay cache file (sqlite, ``openrlhf_search.retrieval.cache``); empty = no cache."""
    cache_mode: str = "record"
    """``record`` (store every answer), ``replay`` (answer only from the cache; a miss fails the step, naming the
    query) or ``reuse`` (cached answers, misses retrieved and stored)."""
