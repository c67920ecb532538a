"""The retrieval contract shared by every retriever (in-process BM25/dense/hybrid, and the HTTP client).

The environment only ever sees :class:`Retriever`: ``search(queries, topk) -> list[list[Hit]]``, one call per
turn for the whole batch. The same shapes are what the Search-R1 ``POST /retrieve`` protocol carries
(``{"document": {"id", "contents"}, "score"}``), so converting between the two is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Document:
    """One passage of the corpus."""

    id: str
    """Stable passage id (the corpus' ``id`` field, as a string)."""
    contents: str
    """Search-R1 style text: ``"Title"\\ntext`` (the title line may be absent)."""
    fields: dict = field(default_factory=dict, compare=False, repr=False)
    """Every other field of the corpus row, as stored (``url``, ``title``, ``wikipedia_title``...): returned by the
    server next to ``id`` and ``contents``, as Search-R1's and ASearcher's servers return the whole row."""

    @property
    def title(self) -> str:
        """The title: the first line of ``contents`` without its quotes (empty if there is no title line)."""
        first, sep, _ = self.contents.partition("\n")
        return first.strip().strip('"') if sep else ""

    @property
    def text(self) -> str:
        """The body: ``contents`` without its title line."""
        first, sep, rest = self.contents.partition("\n")
        return rest if sep else first

    def to_json(self) -> dict:
        """The corpus row: ``id``, ``contents`` and every stored field."""
        if not self.fields:
            return {"id": self.id, "contents": self.contents}
        return {"id": self.id, "contents": self.contents, **self.fields}

    @classmethod
    def from_json(cls, obj: dict) -> Document:
        """The inverse of :meth:`to_json` (other keys become :attr:`fields`)."""
        fields = {k: v for k, v in obj.items() if k not in ("id", "contents")}
        return cls(str(obj.get("id", "")), str(obj.get("contents", "")), fields)


@dataclass(frozen=True)
class Hit:
    """A retrieved document and its score (higher is better)."""

    document: Document
    score: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)

    def to_json(self, return_scores: bool = True) -> dict:
        out: dict = {"document": self.document.to_json()}
        if return_scores:
            out["score"] = float(self.score)
        return out

    @classmethod
    def from_json(cls, obj: dict) -> Hit:
        doc = obj.get("document", obj)
        return cls(Document.from_json(doc), float(obj.get("score", 0.0)))


@runtime_checkable
class Retriever(Protocol):
    """Anything that can answer a batch of queries with top-k hits each."""

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        """Return, for each query in order, up to ``topk`` hits sorted by decreasing score."""
        ...
