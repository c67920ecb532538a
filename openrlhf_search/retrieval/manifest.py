"""The index manifest: what was indexed, how, and from which corpus bytes.

``openrlhf-search index`` writes ``manifest.json`` next to the index files; ``load_retriever`` reads it to pick
the loader (:data:`openrlhf_search.retrieval.LOADERS`), and ``openrlhf-search serve --corpus F`` compares the
corpus fingerprint (size, then SHA-256) so a server never answers with passages from a different corpus than the
one the index was built from.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openrlhf_search import __version__
from openrlhf_search.registry import Registry

from .corpus import FileFingerprint, file_fingerprint

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

LOADERS: Registry[str | Callable] = Registry("retriever kind")
"""Index manifest ``method`` -> ``"module:callable"`` (or a callable) ``(directory, **kwargs) -> Retriever``. A plugin
adds a kind with ``LOADERS.add("mine", "my_pkg.index:MyRetriever.from_dir")`` (re-exported as
``openrlhf_search.retrieval.LOADERS``)."""
LOADERS.add("bm25", "openrlhf_search.retrieval.bm25:BM25Retriever.from_dir")
LOADERS.add("dense", "openrlhf_search.retrieval.dense:DenseRetriever.from_dir")
LOADERS.add("hybrid", "openrlhf_search.retrieval.hybrid:HybridRetriever.from_dir")


class ManifestError(ValueError):
    """A missing/invalid manifest, or an index that does not match the corpus it is served with."""


@dataclass
class Manifest:
    """Contents of ``manifest.json``."""

    method: str
    """Index kind: a key of ``openrlhf_search.retrieval.LOADERS`` (``bm25``, ``dense``, ``hybrid``)."""
    count: int
    """Number of indexed passages."""
    corpus_path: str = ""
    """The corpus file the index was built from (informational; the fingerprint is what is checked)."""
    corpus_size: int = -1
    """Corpus size in bytes (-1: unknown, e.g. built from an in-memory list)."""
    corpus_sha256: str = ""
    """Hex SHA-256 of the corpus file ("" if unknown)."""
    skipped: int = 0
    """Bad corpus rows skipped while indexing."""
    encoder: str = ""
    """Dense encoder name/path ("" for BM25)."""
    params: dict = field(default_factory=dict)
    """The method's build parameters (BM25 k1/b/stemmer..., FAISS index type...)."""
    version: str = ""
    """openrlhf-search version that wrote the index."""
    format_version: int = FORMAT_VERSION
    """Manifest schema version."""
    created: str = ""
    """UTC build time (ISO 8601)."""

    def save(self, directory: str | os.PathLike) -> Path:
        self.version = self.version or __version__
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{directory}: no {MANIFEST_NAME}; is this an index built by `openrlhf-search index`?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        known = set(cls.__dataclass_fields__)
        missing = {"method", "count"} - set(data)
        if missing:
            raise ManifestError(f"{path}: missing field(s) {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def set_corpus(self, path: str | os.PathLike, fingerprint: FileFingerprint | None = None) -> None:
        fp = fingerprint or file_fingerprint(path)
        self.corpus_path, self.corpus_size, self.corpus_sha256 = str(path), fp.size, fp.sha256

    def check_corpus(self, path: str | os.PathLike, directory: str | os.PathLike = "") -> None:
        """Raise :class:`ManifestError` unless ``path`` has the size and SHA-256 recorded at build time."""
        where = f"index {directory}" if directory else "the index"
        if not self.corpus_sha256:
            raise ManifestError(f"{where} records no corpus fingerprint; cannot check {path}")
        size = os.path.getsize(path)
        if size != self.corpus_size:
            raise ManifestError(
                f"corpus {path} ({size} bytes) does not match {where}, built from "
                f"{self.corpus_path} ({self.corpus_size} bytes); rebuild the index or pass the matching corpus"
            )
        digest = file_fingerprint(path).sha256
        if digest != self.corpus_sha256:
            raise ManifestError(f"corpus {path} (sha256 {digest[:12]}...) does not match {where}, built from "
                                f"{self.corpus_path} (sha256 {self.corpus_sha256[:12]}...); rebuild the index")
