"""The in-process retriever base: score rows with an index, read the winners from the :class:`DocStore`.

Concrete retrievers (:class:`~openrlhf_search.retrieval.bm25.BM25Retriever`,
:class:`~openrlhf_search.retrieval.dense.DenseRetriever`) implement one method, :meth:`InProcessRetriever.score_rows`
(an index's own top-k, in whatever order it breaks ties); the shared :meth:`InProcessRetriever.search_rows` makes
that deterministic and :meth:`InProcessRetriever.search` turns the rows into :class:`Hit` lists (the ``Retriever``
protocol). The HTTP server works on the arrays, so documents are only decoded for the rows actually returned.

Determinism: hits are ordered by decreasing score, then by increasing document row (the index's document number,
like Lucene's doc id), for every ``topk`` and every batch composition. An index's top-k selection keeps an arbitrary
subset of the documents tied at the k-th score, so ``search_rows`` fetches k + 1 candidates (the extra one shows
whether the k-th score is tied with a document left out) and, when the k-th score ties with the last candidate
fetched, twice as many for that query (until the tie is inside the fetched set or the
whole corpus, or :data:`TIE_FETCH_LIMIT` candidates, are fetched) before sorting; a top-k is then always the prefix
of a top-(k+1). A tie wider than the limit (a term in millions of equal-length passages) is cut where the index's
own top-``TIE_FETCH_LIMIT`` cuts it: still the same answer for every ``topk`` and batch, as that top-N depends only
on the query, but its documents are not then the lowest rows of the tie.
"""

from __future__ import annotations

import abc
import itertools
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from .docstore import DocStore
from .types import Document, Hit

TIE_FETCH_LIMIT = 4096
"""Most candidates fetched per query to resolve a tie at the k-th score (see the module docstring)."""


class InProcessRetriever(abc.ABC):
    """A retriever running in this process over a memory-mapped :class:`DocStore`; honours ``Retriever``."""

    docs: DocStore
    """Passage ids and texts, addressed by row."""

    @abc.abstractmethod
    def score_rows(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's own top-k of a batch of queries (ties in any order).

        Returns:
            ``(rows, scores)``, both ``[len(queries), k]`` with ``k = min(topk, len(docs))``, each row sorted by
            decreasing score; ``rows`` is ``int64`` with ``-1`` marking "no hit" (then the score is ``-inf``).
        """

    def search_rows(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score_rows` with ties broken by document row, independent of ``topk`` (module docstring)."""
        n = len(self.docs)
        k = min(topk, n)
        # one candidate beyond k shows whether the k-th score is tied with a document left out
        fetched, limit = min(n, k + 1), min(n, max(k + 1, TIE_FETCH_LIMIT))
        rows, scores = self.score_rows(queries, fetched)
        while fetched < limit and rows.size:
            # a query needs more candidates when its k-th score (a real hit) equals its last fetched score
            kth, last = scores[:, k - 1], scores[:, -1]
            tied = np.flatnonzero((rows[:, k - 1] >= 0) & (kth == last))
            if not tied.size:
                break
            fetched = min(limit, 2 * fetched)
            more_rows, more_scores = self.score_rows([queries[i] for i in tied], fetched)
            wide_rows = np.full((len(queries), fetched), -1, dtype=np.int64)
            wide_scores = np.full((len(queries), fetched), -np.inf, dtype=np.float32)
            wide_rows[:, : rows.shape[1]], wide_scores[:, : rows.shape[1]] = rows, scores
            wide_rows[tied], wide_scores[tied] = more_rows, more_scores
            rows, scores = wide_rows, wide_scores
        return stable_topk(rows, scores, k)

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

    def get_documents(self, ids_or_titles: list[str]) -> list[Document | None]:
        """Whole documents by passage id or title (the ``open`` tool); ``None`` where nothing matches.

        A key matches a passage id exactly, else a title (case and spacing ignored). The document is every passage
        sharing the matched passage's title, in corpus order, as one :class:`Document` (id of the first passage,
        contents ``"Title"\n`` + the passages' texts joined by newlines); a passage without a title is returned
        alone. The lookup tables are built on the first call (one pass over the store's ids and title lines).
        """
        return documents_by_key(self.docs, ids_or_titles, self)

    def get_pages(self, urls: list[str]) -> list[dict | None]:
        """Whole pages by URL (ASearcher's ``/access``): see :func:`pages_by_url`."""
        return pages_by_url(self.docs, urls, self)


def _norm_title(title: str) -> str:
    return " ".join(title.lower().split())


def documents_by_key(docs: DocStore, keys: list[str], owner) -> list[Document | None]:
    """:meth:`InProcessRetriever.get_documents` over ``docs`` (tables cached on ``owner``)."""
    if isinstance(keys, str):
        raise TypeError("get_documents() takes a list of ids or titles, not a single string")
    tables = getattr(owner, "_doc_tables", None)
    if tables is None:
        by_id: dict[str, int] = {}
        by_title: dict[str, list[int]] = {}
        for row in range(len(docs)):
            doc = docs[row]
            by_id.setdefault(doc.id, row)
            if doc.title:
                by_title.setdefault(_norm_title(doc.title), []).append(row)
        tables = (by_id, by_title)
        owner._doc_tables = tables
    by_id, by_title = tables
    out: list[Document | None] = []
    for key in keys:
        key = str(key).strip()
        row = by_id.get(key)
        if row is None:
            rows = by_title.get(_norm_title(key.strip('"')))
            row = rows[0] if rows else None
        if row is None:
            out.append(None)
            continue
        first = docs[row]
        rows = by_title.get(_norm_title(first.title), [row]) if first.title else [row]
        if len(rows) == 1:
            out.append(first)
            continue
        parts = [docs[r].text for r in rows]
        out.append(Document(docs[rows[0]].id, f'"{first.title}"\n' + "\n".join(parts)))
    return out


def _wiki_title(url: str) -> str | None:
    """The article title in a Wikipedia-style URL (``.../wiki/Title`` or ``...?title=Title``), else ``None``."""
    parsed = urlsplit(url)
    title = parse_qs(parsed.query).get("title", [None])[0]
    if title is None and "/wiki/" in parsed.path:
        title = parsed.path.split("/wiki/", 1)[1]
    return unquote(title).replace("_", " ") if title else None


def pages_by_url(docs: DocStore, urls: list[str], owner) -> list[dict | None]:
    """:meth:`InProcessRetriever.get_pages`: for each URL the whole page as one row, or ``None``.

    A URL matches the passages whose stored ``url`` field equals it (ASearcher's ``index.php/`` spelling is read as
    ``index.php?title=``, as its own server does); the page is the first such row with ``contents`` replaced by the
    title line and every matching passage's text in corpus order. A corpus without ``url`` fields (wiki-18) is
    looked up by the title in a Wikipedia-style URL (:meth:`InProcessRetriever.get_documents`). The URL table is
    built on the first call (one pass over the stored fields).
    """
    if isinstance(urls, str):
        raise TypeError("get_pages() takes a list of URLs, not a single string")
    table = getattr(owner, "_url_table", None)
    if table is None:
        table = {}
        if docs.has_fields:
            for row, fields in enumerate(docs.extra_fields(np.arange(len(docs)))):
                url = fields.get("url")
                if isinstance(url, str):
                    table.setdefault(url, []).append(row)
        owner._url_table = table
    out: list[dict | None] = []
    for url in urls:
        key = url.replace("index.php/", "index.php?title=") if "index.php/" in url else url
        rows = table.get(key) or table.get(url)
        if rows:
            first = docs[rows[0]]
            head = f'"{first.title}"\n' if first.title else ""
            body = "\n".join(docs[r].text if first.title else docs[r].contents for r in rows)
            out.append({**first.to_json(), "contents": head + body})
            continue
        title = _wiki_title(key)
        doc = documents_by_key(docs, [title], owner)[0] if title else None
        out.append(None if doc is None else {**doc.to_json(), "url": url})
    return out


def stable_topk(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` columns after sorting each row of ``(rows, scores)`` by (score desc, row asc); no-hits last."""
    if rows.size == 0:
        return rows[:, :k], scores[:, :k]
    # already sorted with no tie between real hits (each hit strictly below the one before it; no-hits, -inf, after
    # them): the order is the key order
    if np.all((rows[:, 1:] < 0) | (scores[:, 1:] < scores[:, :-1])):
        return rows[:, :k], scores[:, :k]
    big = np.iinfo(np.int64).max
    key_rows = np.where(rows >= 0, rows, big)  # "no hit" (-1, score -inf) sorts after every real row
    order = np.lexsort((key_rows, -scores.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def hits_from_rows(docs: DocStore, rows: np.ndarray, scores: np.ndarray) -> list[list[Hit]]:
    """Decode ``rows[Q, k]`` / ``scores[Q, k]`` into ``Q`` lists of :class:`Hit` (rows < 0 are dropped)."""
    valid = rows >= 0
    ids, contents = docs.fields(rows[valid])  # one vectorised lookup for the whole batch
    flat = iter(zip(ids, contents, docs.extra_fields(rows[valid]), scores[valid].tolist()))
    out: list[list[Hit]] = []
    for n in valid.sum(axis=1).tolist():
        out.append([Hit(Document(i, c, f), s) for i, c, f, s in itertools.islice(flat, n)])
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
