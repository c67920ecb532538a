"""The in-process retriever base: score rows with an index, read the winners from the :class:`DocStore`.

Concrete retrievers (:class:`~openrlhf_search.retrieval.bm25.BM25Retriever`,
:class:`~openrlhf_search.retrieval.dense.DenseRetriever`, :class:`~openrlhf_search.retrieval.hybrid.HybridRetriever`)
implement one method, :meth:`InProcessRetriever.search_rows`, returning row numbers and scores as arrays; the shared
:meth:`InProcessRetriever.search` turns them into :class:`Hit` lists (the ``Retriever`` protocol). The HTTP server
and the hybrid fusion work on the arrays, so documents are only decoded for the rows actually returned.
"""

from __future__ import annotations

import abc
import itertools
import os
import shutil
from pathlib import Path

import numpy as np

from .docstore import DocStore
from .types import Document, Hit


class InProcessRetriever(abc.ABC):
    """A retriever running in this process over a memory-mapped :class:`DocStore`; honours ``Retriever``."""

    docs: DocStore
    """Passage ids and texts, addressed by row."""

    @abc.abstractmethod
    def search_rows(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Score a batch of queries.

        Returns:
            ``(rows, scores)``, both ``[len(queries), k]`` with ``k = min(topk, len(docs))``, each row sorted by
            decreasing score; ``rows`` is ``int64`` with ``-1`` marking "no hit" (then the score is ``-inf``).
        """

    def __len__(self) -> int:
        return len(self.docs)

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        """``Retriever.search``: for each query, up to ``topk`` hits by decreasing score."""
        if isinstance(queries, str):
            raise TypeError("search() takes a list of query strings, not a single string")
        if topk <= 0:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not queries:
            return []
        rows, scores = self.search_rows(list(queries), topk)
        return hits_from_rows(self.docs, rows, scores)


def hits_from_rows(docs: DocStore, rows: np.ndarray, scores: np.ndarray) -> list[list[Hit]]:
    """Decode ``rows[Q, k]`` / ``scores[Q, k]`` into ``Q`` lists of :class:`Hit` (rows < 0 are dropped)."""
    valid = rows >= 0
    ids, contents = docs.fields(rows[valid])  # one vectorised lookup for the whole batch
    flat = iter(zip(ids, contents, scores[valid].tolist()))
    out: list[list[Hit]] = []
    for n in valid.sum(axis=1).tolist():
        out.append([Hit(Document(i, c), s) for i, c, s in itertools.islice(flat, n)])
    return out


class IndexDirectory:
    """Mixin of the on-disk indexes (BM25, dense): an index lives in ``self.directory`` (passages under ``docs/``)
    and knows how to write its own files with ``self._write(directory)``."""

    directory: Path

    def _write(self, directory: Path) -> None:  # pragma: no cover - implemented by each index
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` (copying the passages if the index lives elsewhere)."""
        directory = Path(directory)
        if directory.resolve() != self.directory.resolve():
            directory.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.directory / "docs", directory / "docs", dirs_exist_ok=True)
            self._write(directory)
        return directory
