"""Integrity check of an index directory before it is served or loaded.

A damaged index must be refused at start, with one line naming the file and what is wrong -- not served (a truncated
passage store used to be: ``/health`` counted every passage while hits came back with empty texts) and not turned
into a traceback on the first query. :func:`check_index` verifies, without reading the data into memory:

* ``manifest.json``: valid JSON, a known ``method``, a non-negative integer ``count``;
* the passage store ``docs/`` (:mod:`~openrlhf_search.retrieval.docstore`): each ``*.offsets.npy`` loads (a
  truncated ``.npy`` fails here), is 1-D ``int64`` with ``count + 1`` entries, starts at 0, never decreases, and ends
  exactly at the size of its ``*.bin`` file;
* BM25 (``bm25/``, ``tokenizer/``): bm25s' params / vocabulary JSON, the CSC arrays' shapes agree
  (``indptr`` = vocabulary + 1, ``data`` and ``indices`` = ``indptr[-1]``), ``indptr`` is monotone, ``num_docs`` =
  ``count``, the tokenizer's vocabulary and stop words are valid JSON;
* dense: ``faiss.index`` reads (memory-mapped), holds ``count`` vectors of the manifest's dimension;
* hybrid: both sub-indexes, and their counts equal the hybrid manifest's.

Not checked (it would read every byte): that every passage is valid UTF-8 and every BM25 document index is in
range; a bad byte there still fails the requests that read it (a JSON 500), not the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .dense import read_faiss
from .manifest import LOADERS, MANIFEST_NAME, ManifestError

_CHUNK = 1 << 22  # offsets checked in chunks of 4M entries (bounded memory on wiki-scale stores)


class IndexIntegrityError(ManifestError):
    """A damaged index file: the message is one line naming the file and what is wrong."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}; rebuild the index with `openrlhf-search index`")
        self.path = Path(path)
        self.problem = problem


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise IndexIntegrityError(path, "missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # truncated header/data, not an .npy file, ...
        raise IndexIntegrityError(path, f"unreadable .npy array ({type(exc).__name__}: {exc})") from None


def _load_json(path: Path):
    if not path.is_file():
        raise IndexIntegrityError(path, "missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexIntegrityError(path, f"invalid JSON ({exc})") from None


def _monotone(path: Path, arr: np.ndarray) -> None:
    for start in range(0, len(arr) - 1, _CHUNK):
        part = np.asarray(arr[start : start + _CHUNK + 1])
        bad = np.flatnonzero(np.diff(part) < 0)
        if bad.size:
            i = start + int(bad[0])
            raise IndexIntegrityError(path, f"offsets decrease at entry {i + 1} ({int(part[bad[0]])} -> "
                                            f"{int(part[bad[0] + 1])})")


def check_docstore(directory: Path, count: int) -> None:
    """The passage store of ``count`` documents under ``directory`` (see the module docstring)."""
    for name in ("ids", "contents", "fields"):
        off_path, bin_path = directory / f"{name}.offsets.npy", directory / f"{name}.bin"
        if name == "fields" and not off_path.exists():  # optional: stores written before it existed lack it
            continue
        off = _load_npy(off_path)
        if off.ndim != 1 or off.dtype != np.int64:
            raise IndexIntegrityError(off_path, f"expected a 1-D int64 array, got {off.dtype} of shape {off.shape}")
        if len(off) != count + 1:
            raise IndexIntegrityError(off_path, f"{len(off) - 1} passages, the manifest says {count}")
        if not bin_path.is_file():
            raise IndexIntegrityError(bin_path, "missing")
        size = bin_path.stat().st_size
        if int(off[0]) != 0:
            raise IndexIntegrityError(off_path, f"the first offset is {int(off[0])}, not 0")
        if int(off[-1]) != size:
            what = "truncated" if size < int(off[-1]) else "longer than its offsets say"
            raise IndexIntegrityError(bin_path, f"{what}: {size} bytes, {off_path.name} ends at {int(off[-1])}")
        _monotone(off_path, off)


def check_bm25(directory: Path, count: int) -> None:
    """bm25s' files and the tokenizer of a BM25 index of ``count`` documents."""
    params_path = directory / "bm25" / "params.index.json"
    params = _load_json(params_path)
    if not isinstance(params, dict) or params.get("num_docs") != count:
        got = params.get("num_docs") if isinstance(params, dict) else params
        raise IndexIntegrityError(params_path, f"num_docs is {got!r}, the manifest says {count}")
    vocab_path = directory / "bm25" / "vocab.index.json"
    vocab = _load_json(vocab_path)
    if not isinstance(vocab, dict):
        raise IndexIntegrityError(vocab_path, "expected a JSON object (token -> id)")
    arrays = {}
    for key in ("data", "indices", "indptr"):
        path = directory / "bm25" / f"{key}.csc.index.npy"
        arrays[key] = (path, _load_npy(path))
        if arrays[key][1].ndim != 1:
            raise IndexIntegrityError(path, f"expected a 1-D array, got shape {arrays[key][1].shape}")
    (indptr_path, indptr), (data_path, data), (indices_path, indices) = (arrays["indptr"], arrays["data"],
                                                                         arrays["indices"])
    if len(indptr) != len(vocab) + 1:
        raise IndexIntegrityError(indptr_path, f"{len(indptr)} entries for a vocabulary of {len(vocab)} "
                                               f"({vocab_path.name}); expected {len(vocab) + 1}")
    nnz = int(indptr[-1]) if len(indptr) else 0
    if len(indptr) and int(indptr[0]) != 0:
        raise IndexIntegrityError(indptr_path, f"the first entry is {int(indptr[0])}, not 0")
    for path, arr in ((data_path, data), (indices_path, indices)):
        if len(arr) != nnz:
            raise IndexIntegrityError(path, f"{len(arr)} entries, {indptr_path.name} says {nnz}")
    _monotone(indptr_path, indptr)
    for name in ("vocab.tokenizer.json", "stopwords.tokenizer.json"):
        _load_json(directory / "tokenizer" / name)


def check_dense(directory: Path, count: int, params: dict) -> None:
    """``faiss.index`` of a dense index of ``count`` vectors (for an imported index: a link to the user's file)."""
    path = directory / "faiss.index"
    if not path.is_file():
        target = f" (a link to {os.readlink(path)}, which is gone)" if path.is_symlink() else ""
        raise IndexIntegrityError(path, "missing" + target)
    try:
        index = read_faiss(path)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IndexIntegrityError(path, f"unreadable FAISS index ({first[:200]})") from None
    if index.ntotal != count:
        raise IndexIntegrityError(path, f"{index.ntotal} vectors, the manifest says {count}")
    dim = params.get("dim")
    if isinstance(dim, int) and index.d != dim:
        raise IndexIntegrityError(path, f"{index.d}-d vectors, the manifest says {dim}")


def check_index(directory: str | os.PathLike) -> dict:
    """Verify every file of the index in ``directory``; returns its manifest data.

    Raises:
        IndexIntegrityError: one line naming the damaged file and what is wrong.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise IndexIntegrityError(manifest_path, f"missing (no {MANIFEST_NAME}: not an index directory written by "
                                                 "`openrlhf-search index`)")
    data = _load_json(manifest_path)
    if not isinstance(data, dict):
        raise IndexIntegrityError(manifest_path, "expected a JSON object")
    method, count = data.get("method"), data.get("count")
    if method not in LOADERS:
        raise IndexIntegrityError(manifest_path, f"unknown index method {method!r}; known: {sorted(LOADERS)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise IndexIntegrityError(manifest_path, f"'count' must be a non-negative integer, got {count!r}")
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    if method == "hybrid":
        for sub in ("bm25", "dense"):
            sub_data = check_index(directory / sub)
            if sub_data.get("count") != count:
                raise IndexIntegrityError(directory / sub / MANIFEST_NAME,
                                          f"{sub_data.get('count')} passages, the hybrid manifest says {count}")
        return data
    check_docstore(directory / "docs", count)
    if method == "bm25":
        check_bm25(directory, count)
    elif method == "dense":
        check_dense(directory, count, params)
    return data
