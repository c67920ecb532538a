"""Hybrid retrieval: reciprocal-rank fusion (RRF) of several retrievers (typically BM25 + dense).

RRF (Cormack, Clarke & Buettcher, SIGIR 2009) scores a document by its ranks in the fused lists,

    RRF(d) = sum_r  w_r / (k + rank_r(d)),        rank_r(d) = 1, 2, ... (absent from list r: no term)

with ``k = 60`` in the paper. It needs no score calibration between BM25's unbounded scores and cosine similarity,
which is why it is the usual default for sparse+dense fusion. Documents are matched by ``Document.id``, so the
parts may be any :class:`Retriever` (in-process indexes built separately, or HTTP servers); each part is asked for
``depth`` candidates (default ``max(topk, 20)``) and the fused top-k is returned with the RRF score.

A hybrid index directory holds ``bm25/`` and ``dense/`` sub-indexes (each with its own passage store, i.e. the
passages are stored twice on disk) and a top-level ``manifest.json`` with method ``hybrid``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from .bm25 import BM25Index, BM25Retriever
from .cache import manifest_fingerprint
from .dense import DenseIndex, DenseRetriever
from .manifest import Manifest, ManifestError
from .types import Hit, Retriever


def reciprocal_rank_fusion(
    ranked: Sequence[Sequence[Hit]], topk: int, k: float = 60.0, weights: Sequence[float] | None = None
) -> list[Hit]:
    """Fuse ranked hit lists of ONE query.

    Args:
        ranked: one list of hits per retriever, each sorted best first.
        topk: number of fused hits to return.
        k: the RRF constant (larger -> flatter rank discount).
        weights: per-retriever weights ``w_r`` (default all 1).

    Returns:
        Up to ``topk`` hits sorted by decreasing RRF score (ties: earlier retriever, then better rank, first);
        each carries the fused score and, in ``extra["ranks"]``, its 1-based rank in every list (``None`` if absent).
    """
    weights = list(weights) if weights is not None else [1.0] * len(ranked)
    if len(weights) != len(ranked):
        raise ValueError(f"got {len(weights)} weights for {len(ranked)} ranked lists")
    scores: dict[str, float] = {}
    first_seen: dict[str, tuple[int, int]] = {}
    docs: dict[str, Hit] = {}
    ranks: dict[str, list] = {}
    for r, (hits, w) in enumerate(zip(ranked, weights)):
        for rank, hit in enumerate(hits, start=1):
            doc_id = hit.document.id
            if doc_id in ranks and ranks[doc_id][r] is not None:
                continue  # a duplicate within one list counts once, at its best rank
            scores[doc_id] = scores.get(doc_id, 0.0) + w / (k + rank)
            first_seen.setdefault(doc_id, (r, rank))
            docs.setdefault(doc_id, hit)
            ranks.setdefault(doc_id, [None] * len(ranked))[r] = rank
    order = sorted(scores, key=lambda d: (-scores[d], first_seen[d]))[:topk]
    return [Hit(docs[d].document, scores[d], {"ranks": ranks[d]}) for d in order]


class HybridRetriever:
    """RRF over several retrievers; honours ``Retriever`` (one batched ``search`` per part per call)."""

    def __init__(self, parts: Sequence[Retriever], k: float = 60.0, depth: int = 20,
                 weights: Sequence[float] | None = None):
        if not parts:
            raise ValueError("HybridRetriever needs at least one retriever")
        self.parts = list(parts)
        self.k = k
        self.depth = depth
        self.weights = list(weights) if weights is not None else None

    def __len__(self) -> int:
        return len(self.parts[0])  # type: ignore[arg-type]

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of query strings, not a single string")
        if topk <= 0:
            raise ValueError(f"topk must be >= 1, got {topk}")
        per_part = [part.search(list(queries), max(topk, self.depth)) for part in self.parts]
        fuse = reciprocal_rank_fusion
        return [fuse([p[i] for p in per_part], topk, self.k, self.weights) for i in range(len(queries))]

    def get_documents(self, ids_or_titles: list[str]):
        """Whole documents by id or title (the ``open`` tool), from the first part's corpus (all parts index the
        same corpus)."""
        return self.parts[0].get_documents(ids_or_titles)

    def get_pages(self, urls: list[str]):
        """Whole pages by URL (ASearcher's ``/access``), from the first part's corpus."""
        return self.parts[0].get_pages(urls)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, n_threads: int = 0, **_) -> HybridRetriever:

        directory = Path(directory)
        manifest = Manifest.load(directory)
        if manifest.method != "hybrid":
            raise ManifestError(f"{directory}: manifest method is {manifest.method!r}, not 'hybrid'")
        params = manifest.params
        parts = [BM25Retriever.from_dir(directory / "bm25", n_threads=n_threads),
                 DenseRetriever.from_dir(directory / "dense")]
        hybrid = cls(parts, k=params.get("rrf_k", 60.0), depth=params.get("depth", 20), weights=params.get("weights"))
        hybrid.fingerprint = manifest_fingerprint(manifest)  # keys the record/replay cache, reported by /health
        return hybrid


def build_hybrid_index(corpus: str | os.PathLike, out_dir: str | os.PathLike, bm25_config, dense_config,
                       on_error: str = "raise", show_progress: bool = True, rrf_k: float = 60.0,
                       depth: int = 20) -> Manifest:
    """Build ``out_dir/bm25`` and ``out_dir/dense`` from one corpus file and write the hybrid manifest."""

    out = Path(out_dir)
    bm25 = BM25Index.build(corpus, out / "bm25", config=bm25_config, on_error=on_error, show_progress=show_progress)
    dense = DenseIndex.build(corpus, out / "dense", config=dense_config, on_error=on_error,
                             show_progress=show_progress)
    if bm25.manifest.count != dense.manifest.count:
        raise ManifestError(f"{out}: BM25 indexed {bm25.manifest.count} passages but dense {dense.manifest.count}")
    manifest = Manifest(method="hybrid", count=bm25.manifest.count, encoder=dense_config.encoder,
                        corpus_path=bm25.manifest.corpus_path, corpus_size=bm25.manifest.corpus_size,
                        corpus_sha256=bm25.manifest.corpus_sha256, skipped=bm25.manifest.skipped,
                        params={"rrf_k": rrf_k, "depth": depth, "bm25": dataclasses.asdict(bm25_config),
                                "dense": dataclasses.asdict(dense_config)})
    manifest.save(out)
    return manifest
