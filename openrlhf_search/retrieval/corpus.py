"""Streaming corpus readers for the Search-R1 / FlashRAG passage formats.

A retrieval corpus such as wiki-18 (21M passages, ~14 GB of jsonl) must never be materialised as a Python list:
the index builders consume :func:`read_corpus` lazily, once, and spill the passage texts to an on-disk
:class:`~openrlhf_search.retrieval.docstore.DocStore` while they tokenize or encode them.

Accepted row shapes (jsonl lines or parquet rows):

* ``{"id": ..., "contents": "\\"Title\\"\\ntext"}`` -- Search-R1 and FlashRAG (``contents`` kept verbatim);
* ``{"id": ..., "title": ..., "text": ...}`` -- converted to ``"Title"\\ntext`` (``title`` may be empty or absent).

Every other field of a row (``url``, ``wikipedia_title``, ``title``/``text`` themselves...) is kept in
:attr:`Document.fields` and stored with the passage, so the server returns each row as stored, as Search-R1's and
ASearcher's servers do (their clients read such fields).

``id`` is converted to ``str``; when a row has no ``id`` the 0-based row number is used (FlashRAG corpora always
carry one, some hand-made corpora do not). A bad row (invalid JSON, not an object, no text field, non-string text)
raises :class:`CorpusError` naming the file and the 1-based line (jsonl) or 0-based row (parquet), or, with
``on_error="skip"``, is counted in :attr:`CorpusReader.skipped` (the first few messages are kept in
:attr:`CorpusReader.errors`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .types import Document

ON_ERROR_CHOICES = ("raise", "skip")
MAX_KEPT_ERRORS = 20


class CorpusError(ValueError):
    """A corpus row (or the corpus file itself) cannot be read; the message names the file and line/row."""


def row_to_document(row: object, fallback_id: int) -> Document:
    """Convert one decoded row (a dict) into a :class:`Document`.

    Args:
        row: the decoded JSON object / parquet row.
        fallback_id: the id to use when the row has no ``id`` field (its row number).

    Raises:
        ValueError: with a short reason (the caller adds the file and line).
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    raw_id = row.get("id", fallback_id)
    if raw_id is None or isinstance(raw_id, (dict, list)):
        raise ValueError(f"field 'id' must be a string or a number, got {raw_id!r}")
    contents = row.get("contents")
    if contents is None:
        text = row.get("text")
        if text is None:
            raise ValueError(f"no 'contents' and no 'text' field (keys: {sorted(row)[:8]})")
        if not isinstance(text, str):
            raise ValueError(f"field 'text' must be a string, got {type(text).__name__}")
        title = row.get("title") or ""
        if not isinstance(title, str):
            raise ValueError(f"field 'title' must be a string, got {type(title).__name__}")
        contents = f'"{title}"\n{text}' if title else text
    elif not isinstance(contents, str):
        raise ValueError(f"field 'contents' must be a string, got {type(contents).__name__}")
    return Document(str(raw_id), contents, {k: v for k, v in row.items() if k not in ("id", "contents")})


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _iter_jsonl(path: Path, batch_size: int) -> Iterator[tuple[str, object]]:
    """Yield ``(location, row_or_exception)`` for every non-blank line of a (gzipped) jsonl file.

    Lines are read as bytes and decoded one by one, so a non-UTF-8 line is reported with its own line number and
    can be skipped like any other bad row.
    """
    del batch_size  # lines are read one by one; the OS and the buffered reader batch the I/O
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield f"line {lineno}", ValueError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {lineno}", ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})")


def _iter_parquet(path: Path, batch_size: int) -> Iterator[tuple[str, object]]:
    """Yield ``(location, row)`` for every row of a parquet file, reading ``batch_size`` rows at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise CorpusError(f"{path}: cannot open as parquet: {exc}") from exc
    names = set(pf.schema_arrow.names)
    if "contents" not in names and "text" not in names:
        raise CorpusError(f"{path}: parquet has no 'contents' or 'text' column (columns: {sorted(names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):  # every column: the extra fields are kept
        for rec in batch.to_pylist():
            yield f"row {row}", rec
            row += 1


# suffix -> reader; a reader yields (location, decoded row or a ValueError describing why the row is bad).
CORPUS_FORMATS: dict[str, Callable[[Path, int], Iterator[tuple[str, object]]]] = {
    ".jsonl": _iter_jsonl,
    ".jsonl.gz": _iter_jsonl,
    ".parquet": _iter_parquet,
}


def corpus_format(path: str | os.PathLike) -> str:
    """The :data:`CORPUS_FORMATS` key matching ``path``'s suffix, or a :class:`CorpusError` listing the valid ones."""
    name = str(path).lower()
    for suffix in sorted(CORPUS_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise CorpusError(f"{path}: unknown corpus format; expected a file ending in one of {sorted(CORPUS_FORMATS)}")


@dataclass
class CorpusReader:
    """An iterable over the documents of one corpus file, streaming (each pass re-reads the file).

    Iterate it to get :class:`Document` objects; after (or during) a pass, :attr:`count` and :attr:`skipped`
    describe the rows seen so far.
    """

    path: Path
    """The corpus file (``.jsonl``, ``.jsonl.gz`` or ``.parquet``)."""
    on_error: str = "raise"
    """``"raise"``: a bad row raises :class:`CorpusError` (file + line); ``"skip"``: it is counted and skipped."""
    batch_size: int = 8192
    """Rows per parquet record batch (bounded memory)."""
    count: int = 0
    """Documents yielded by the current/last pass."""
    skipped: int = 0
    """Bad rows skipped by the current/last pass (``on_error="skip"`` only)."""
    errors: list[str] = field(default_factory=list)
    """The first :data:`MAX_KEPT_ERRORS` skip messages of the current/last pass."""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")
        if not self.path.is_file():
            raise CorpusError(f"{self.path}: corpus file not found")
        self._reader = CORPUS_FORMATS[corpus_format(self.path)]

    def __iter__(self) -> Iterator[Document]:
        self.count = self.skipped = 0
        self.errors = []
        for index, (where, row) in enumerate(self._reader(self.path, self.batch_size)):
            try:
                if isinstance(row, Exception):
                    raise row
                doc = row_to_document(row, fallback_id=index)
            except ValueError as exc:
                message = f"{self.path}, {where}: {exc}"
                if self.on_error == "raise":
                    raise CorpusError(message + " (use on_error='skip' / --skip-bad-rows to skip bad rows)") from None
                self.skipped += 1
                if len(self.errors) < MAX_KEPT_ERRORS:
                    self.errors.append(message)
                continue
            self.count += 1
            yield doc


def read_corpus(path: str | os.PathLike, on_error: str = "raise", batch_size: int = 8192) -> CorpusReader:
    """Open a corpus for streaming: ``for doc in read_corpus("wiki-18.jsonl"): ...``.

    Args:
        path: a ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line) or ``.parquet`` file.
        on_error: ``"raise"`` (default) or ``"skip"`` (count bad rows in ``reader.skipped``).
        batch_size: parquet rows decoded at a time.
    """
    return CorpusReader(Path(path), on_error=on_error, batch_size=batch_size)


def write_corpus_jsonl(docs: Iterable[Document], path: str | os.PathLike) -> int:
    """Write documents as Search-R1 jsonl (``{"id", "contents"}`` per line); returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


@dataclass(frozen=True)
class FileFingerprint:
    """Identity of a corpus file, stored in an index manifest."""

    size: int
    """Size in bytes."""
    sha256: str
    """Hex SHA-256 of the bytes."""


def file_fingerprint(path: str | os.PathLike, chunk_size: int = 1 << 22) -> FileFingerprint:
    """Stream ``path`` through SHA-256 (4 MiB chunks; ~1-2 s per GB on one core)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
    return FileFingerprint(size=size, sha256=digest.hexdigest())
