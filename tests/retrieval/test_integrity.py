"""Damaged index files are refused at start: one line naming the file and the problem, exit 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openrlhf_search.retrieval.integrity import IndexIntegrityError, check_index


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, len(data) // 2)])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage{")


def _append(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"extra")


def _shrink_npy(path: Path) -> None:  # a valid .npy with one entry fewer
    np.save(path, np.load(path)[:-1])


def _decreasing(path: Path) -> None:
    arr = np.load(path).copy()
    arr[3], arr[4] = arr[4] + 5, arr[3]
    np.save(path, arr)


def _manifest_count(path: Path) -> None:
    data = json.loads(path.read_text())
    data["count"] += 1
    path.write_text(json.dumps(data))


def _delete(path: Path) -> None:
    path.unlink()


# (file inside the BM25 index, damage, words the one-line message must contain)
BM25_DAMAGE = [
    ("manifest.json", _garbage, "invalid JSON"),
    ("manifest.json", _manifest_count, "ids.offsets.npy: 48 passages, the manifest says 49"),
    ("docs/contents.bin", _truncate, "truncated"),
    ("docs/contents.bin", _append, "longer than its offsets"),
    ("docs/contents.offsets.npy", _truncate, "unreadable .npy"),
    ("docs/contents.offsets.npy", _shrink_npy, "47 passages"),
    ("docs/contents.offsets.npy", _decreasing, "offsets decrease"),
    ("docs/ids.bin", _truncate, "truncated"),
    ("docs/ids.offsets.npy", _garbage, "unreadable .npy"),
    ("docs/ids.offsets.npy", _delete, "missing"),
    ("bm25/data.csc.index.npy", _truncate, "unreadable .npy"),
    ("bm25/data.csc.index.npy", _shrink_npy, "entries"),
    ("bm25/indices.csc.index.npy", _shrink_npy, "entries"),
    ("bm25/indptr.csc.index.npy", _shrink_npy, "vocabulary"),
    ("bm25/indptr.csc.index.npy", _decreasing, "offsets decrease"),
    ("bm25/params.index.json", _garbage, "invalid JSON"),
    ("bm25/vocab.index.json", _truncate, "invalid JSON"),
    ("tokenizer/vocab.tokenizer.json", _truncate, "invalid JSON"),
    ("tokenizer/stopwords.tokenizer.json", _delete, "missing"),
]


@pytest.mark.parametrize(("name", "damage", "words"), BM25_DAMAGE,
                         ids=[f"{n}-{d.__name__.strip('_')}" for n, d, _ in BM25_DAMAGE])
def test_each_damaged_bm25_file_is_named(tmp_path, bm25_dir, name, damage, words):
    index = tmp_path / "idx"
    shutil.copytree(bm25_dir, index)
    check_index(index)  # intact
    damage(index / name)
    with pytest.raises(IndexIntegrityError) as info:
        check_index(index)
    message = str(info.value)
    named = index / "docs" if damage is _manifest_count else index / name  # a count mismatch names both files
    assert str(named) in message and words in message and "\n" not in message


def test_serve_refuses_a_truncated_passage_store_in_one_line(tmp_path, bm25_dir, capsys):
    """The issue's case: a truncated contents.bin used to be served (/health counted every passage)."""
    from openrlhf_search.cli import main

    index = tmp_path / "idx"
    shutil.copytree(bm25_dir, index)
    _truncate(index / "docs" / "contents.bin")
    assert main(["serve", "--index", str(index), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "contents.bin: truncated" in err and "Traceback" not in err


def test_serve_subprocess_damaged_index_exit_2_no_traceback(tmp_path, bm25_dir):
    index = tmp_path / "idx"
    shutil.copytree(bm25_dir, index)
    _garbage(index / "bm25" / "indptr.csc.index.npy")
    proc = subprocess.run([sys.executable, "-m", "openrlhf_search.cli", "serve", "--index", str(index), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "indptr.csc.index.npy: unreadable .npy" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_load_retriever_checks_too(tmp_path, bm25_dir):
    from openrlhf_search.retrieval import load_retriever

    index = tmp_path / "idx"
    shutil.copytree(bm25_dir, index)
    _truncate(index / "docs" / "ids.bin")
    with pytest.raises(ValueError, match="ids.bin: truncated"):
        load_retriever(index)


def test_damaged_faiss_index_is_named(tmp_path, bm25_dir):
    """faiss.index of a dense index (written with a raw FAISS index; no encoder needed for the check)."""
    import faiss

    from openrlhf_search.retrieval.docstore import DocStoreWriter
    from openrlhf_search.retrieval.manifest import Manifest
    from openrlhf_search.retrieval.types import Document

    index = tmp_path / "dense"
    with DocStoreWriter(index / "docs") as writer:
        for i in range(20):
            writer.add(Document(str(i), f"passage {i}"))
    flat = faiss.IndexFlatIP(8)
    flat.add(np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    faiss.write_index(flat, str(index / "faiss.index"))
    Manifest(method="dense", count=20, params={"dim": 8}).save(index)
    check_index(index)
    Manifest(method="dense", count=20, params={"dim": 16}).save(index)
    with pytest.raises(IndexIntegrityError, match="8-d vectors, the manifest says 16"):
        check_index(index)
    Manifest(method="dense", count=21, params={"dim": 8}).save(index)
    with pytest.raises(IndexIntegrityError, match="20 passages, the manifest says 21"):
        check_index(index)  # the passage store is checked first
    Manifest(method="dense", count=20, params={"dim": 8}).save(index)
    _truncate(index / "faiss.index")
    with pytest.raises(IndexIntegrityError, match=r"faiss\.index: unreadable FAISS index") as info:
        check_index(index)
    assert "\n" not in str(info.value)

    # a hybrid index: both parts are checked, and their counts against the hybrid manifest
    flat = faiss.IndexFlatIP(8)
    flat.add(np.random.default_rng(0).standard_normal((48, 8)).astype(np.float32))
    hybrid = tmp_path / "hybrid"
    shutil.copytree(bm25_dir, hybrid / "bm25")
    with DocStoreWriter(hybrid / "dense" / "docs") as writer:
        for i in range(48):
            writer.add(Document(str(i), f"passage {i}"))
    faiss.write_index(flat, str(hybrid / "dense" / "faiss.index"))
    Manifest(method="dense", count=48, params={"dim": 8}).save(hybrid / "dense")
    Manifest(method="hybrid", count=48).save(hybrid)
    check_index(hybrid)
    _truncate(hybrid / "dense" / "docs" / "contents.bin")
    with pytest.raises(IndexIntegrityError, match=r"dense/docs/contents\.bin: truncated"):
        check_index(hybrid)
