"""An on-disk, memory-mapped store of passage ids and texts, addressed by row number.

Every index (BM25, dense) keeps its corpus here instead of in RAM: the builder streams the corpus once, appending
each passage's UTF-8 bytes to ``contents.bin`` and its end offset to an ``int64`` array; a retriever then maps the
files and decodes only the rows it returns (top-k x batch), so serving wiki-18 costs page cache, not Python
objects, and the corpus is never loaded twice.

Layout of a store directory::

    contents.bin        UTF-8 passage texts, concatenated
    contents.offsets.npy  int64[n + 1], row i is contents.bin[off[i]:off[i+1]]
    ids.bin / ids.offsets.npy   the same for the passage ids
    fields.bin / fields.offsets.npy   the row's other fields as one JSON object (empty when it has none); stores
                                      written before these files existed have no extra fields
"""

from __future__ import annotations

import json
import mmap
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .types import Document

_FILES = ("contents", "ids")
_OPTIONAL = ("fields",)


class DocStoreWriter:
    """Append documents to a new store; use as a context manager (``close`` writes the offset arrays)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fh = {name: open(self.directory / f"{name}.bin", "wb") for name in (*_FILES, *_OPTIONAL)}
        self._offsets = {name: array("q", [0]) for name in (*_FILES, *_OPTIONAL)}
        self._pos = dict.fromkeys((*_FILES, *_OPTIONAL), 0)

    def add(self, doc: Document) -> int:
        """Append one document (its extra fields too); returns its row number."""
        extra = json.dumps(doc.fields, ensure_ascii=False, default=str) if doc.fields else ""
        for name, value in (("contents", doc.contents), ("ids", doc.id), ("fields", extra)):
            data = value.encode("utf-8")
            self._fh[name].write(data)
            self._pos[name] += len(data)
            self._offsets[name].append(self._pos[name])
        return len(self) - 1

    def __len__(self) -> int:
        return len(self._offsets["contents"]) - 1

    def close(self) -> None:
        for name in (*_FILES, *_OPTIONAL):
            self._fh[name].close()
            np.save(self.directory / f"{name}.offsets.npy", np.frombuffer(self._offsets[name], dtype=np.int64))

    def __enter__(self) -> DocStoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def store_documents(docs: Iterable[Document], directory: str | os.PathLike, *, show_progress: bool = False,
                    desc: str = "import: passages") -> int:
    """Copy documents into a new store at ``directory`` (a tqdm bar when ``show_progress``); returns their count."""
    from tqdm.auto import tqdm

    with DocStoreWriter(directory) as writer, tqdm(desc=desc, unit="passage", disable=not show_progress) as bar:
        for doc in docs:
            writer.add(doc)
            bar.update(1)
    return len(writer)


def spill_documents(docs: Iterable[Document], writer: DocStoreWriter) -> Iterator[str]:
    """Pass-through generator: store every document and yield its contents (for a tokenizer/encoder)."""
    for doc in docs:
        writer.add(doc)
        yield doc.contents


class DocStore(Sequence[Document]):
    """Read-only, memory-mapped view of a store written by :class:`DocStoreWriter`. Thread-safe for reads."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._offsets: dict[str, np.ndarray] = {}
        self._maps: dict[str, mmap.mmap | bytes] = {}
        for name in (*_FILES, *_OPTIONAL):
            off_path, bin_path = self.directory / f"{name}.offsets.npy", self.directory / f"{name}.bin"
            if name in _OPTIONAL and not off_path.is_file():
                continue
            if not off_path.is_file() or not bin_path.is_file():
                raise FileNotFoundError(f"{self.directory}: not a document store (missing {off_path.name} or "
                                        f"{bin_path.name}); rebuild the index with `openrlhf-search index`")
            # a plain ndarray view of the mapped file: np.memmap's per-item __getitem__ is ~10x slower
            self._offsets[name] = np.load(off_path, mmap_mode="r").view(np.ndarray)
            if bin_path.stat().st_size == 0:
                self._maps[name] = b""
            else:
                with open(bin_path, "rb") as fh:
                    self._maps[name] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if len({len(off) for off in self._offsets.values()}) != 1:
            raise ValueError(f"{self.directory}: the offset arrays disagree in length; the store is corrupt")
        self._n = len(self._offsets["contents"]) - 1
        # any row with extra fields? (a store of bare {id, contents} rows skips the per-hit JSON decoding)
        self.has_fields = "fields" in self._offsets and int(self._offsets["fields"][-1]) > 0

    def __len__(self) -> int:
        return self._n

    def _field(self, name: str, i: int) -> str:
        off = self._offsets[name]
        return self._maps[name][int(off[i]) : int(off[i + 1])].decode("utf-8")

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document row {i} out of range for a store of {n}")
        extra = self._field("fields", i) if self.has_fields else ""
        return Document(self._field("ids", i), self._field("contents", i), json.loads(extra) if extra else {})

    def fields(self, rows: np.ndarray | list[int]) -> tuple[list[str], list[str]]:
        """``(ids, contents)`` of many rows at once (vectorised offset lookup; rows must be in range)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self._n):
            raise IndexError(f"document rows out of range for a store of {self._n}")
        out = []
        for name in ("ids", "contents"):
            off, data = self._offsets[name], self._maps[name]
            starts, ends = off[rows].tolist(), off[rows + 1].tolist()
            out.append([data[a:b].decode("utf-8") for a, b in zip(starts, ends)])
        return out[0], out[1]

    def extra_fields(self, rows: np.ndarray | list[int]) -> list[dict]:
        """The extra fields (``{}`` when none) of many rows at once (rows must be in range)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.has_fields:
            return [{} for _ in range(rows.size)]
        off, data = self._offsets["fields"], self._maps["fields"]
        return [json.loads(data[a:b]) if b > a else {} for a, b in zip(off[rows].tolist(), off[rows + 1].tolist())]

    def get_many(self, rows: Iterable[int]) -> list[Document]:
        """Documents for the given row numbers, in order."""
        rows = list(rows)
        ids, contents = self.fields(rows)
        return [Document(i, c, f) for i, c, f in zip(ids, contents, self.extra_fields(rows))]
