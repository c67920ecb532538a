"""BM25: known passage for known query, hand-computed Lucene scores, analysis options, save/load, load_retriever."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openrlhf_search.retrieval import load_retriever
from openrlhf_search.retrieval.bm25 import BM25Config, BM25Index, BM25Retriever
from openrlhf_search.retrieval.manifest import Manifest, ManifestError
from openrlhf_search.retrieval.types import Document, Retriever


def test_known_passage_ranked_first(bm25_retriever, known_queries):
    queries = list(known_queries)
    results = bm25_retriever.search(queries, topk=3)
    assert isinstance(bm25_retriever, Retriever)
    assert [hits[0].document.id for hits in results] == [known_queries[q] for q in queries]
    for hits in results:
        assert 1 <= len(hits) <= 3
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_lucene_scores_match_hand_computation(tmp_path):
    """score(q, d) = sum_t idf(t) * tf / (tf + k1 (1 - b + b |d| / avgdl)), idf = ln(1 + (N - df + .5) / (df + .5))."""
    texts = ["apple banana apple", "banana cherry", "cherry durian elderberry figs"]
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    cfg = BM25Config(k1=1.2, b=0.75, stemmer=None, stopwords=None)
    retriever = BM25Retriever(BM25Index.build(docs, tmp_path / "idx", config=cfg))
    tokens = [t.split() for t in texts]
    n, avgdl = len(tokens), sum(map(len, tokens)) / len(tokens)

    def expected(query: str, d: list[str]) -> float:
        total = 0.0
        for term in query.split():
            df = sum(term in doc for doc in tokens)
            tf = d.count(term)
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                total += idf * tf / (tf + cfg.k1 * (1 - cfg.b + cfg.b * len(d) / avgdl))
        return total

    for query in ["apple", "banana cherry", "durian figs apple"]:
        hits = retriever.search([query], topk=3)[0]
        want = sorted(((expected(query, d), str(i)) for i, d in enumerate(tokens) if expected(query, d) > 0),
                      reverse=True)
        assert [h.document.id for h in hits] == [doc_id for _, doc_id in want]
        np.testing.assert_allclose([h.score for h in hits], [s for s, _ in want], rtol=1e-5)


def test_stemming_and_stopwords_are_configurable(tmp_path):
    docs = [Document("a", "The cats were running quickly"), Document("b", "A dog sleeps"), Document("c", "zebra")]
    stemmed = BM25Retriever(BM25Index.build(docs, tmp_path / "s", stemmer="english", stopwords="en"))
    raw = BM25Retriever(BM25Index.build(docs, tmp_path / "r", stemmer=None, stopwords=None))
    assert [h.document.id for h in stemmed.search(["cat run"], 3)[0]] == ["a"]  # cats/running -> cat/run
    assert raw.search(["cat run"], 3) == [[]]
    assert stemmed.search(["the of a"], 3) == [[]]  # only stop words: no hits
    assert [h.document.id for h in raw.search(["the"], 3)[0]] == ["a"]


def test_edge_queries(bm25_retriever, documents):
    results = bm25_retriever.search(["", "qwertyuiop", "Paris", "paris"], topk=2)
    assert results[0] == [] and results[1] == []
    assert results[2] == results[3] and results[2][0].document.id == "paris"
    assert bm25_retriever.search([], topk=3) == []
    big = bm25_retriever.search(["capital"], topk=10_000)[0]  # topk > corpus size is clamped
    assert 1 <= len(big) <= len(documents)
    with pytest.raises(ValueError, match="topk"):
        bm25_retriever.search(["x"], topk=0)
    with pytest.raises(TypeError, match="list of query strings"):
        bm25_retriever.search("capital of France", topk=1)


def test_batch_equals_one_by_one(bm25_retriever, known_queries):
    queries = list(known_queries) + ["river", "planet sun", "alpha bravo item3"]
    batched = bm25_retriever.search(queries, topk=3)
    single = [bm25_retriever.search([q], topk=3)[0] for q in queries]
    assert batched == single


def test_save_load_round_trip_mmap(tmp_path, documents, known_queries):
    built = BM25Index.build(documents)  # in a temporary directory
    saved = built.save(tmp_path / "copy")
    loaded = BM25Index.load(saved, mmap=True)
    data = loaded.model.scores["data"]
    assert isinstance(data.base, np.memmap) and data.flags.writeable  # mapped copy-on-write (numba-fast), not read
    queries = list(known_queries) + ["alpha charlie"]
    assert BM25Retriever(loaded).search(queries, 3) == BM25Retriever(built).search(queries, 3)
    assert loaded.manifest.count == len(documents) and loaded.manifest.params["k1"] == 0.9
    numpy_backend = BM25Retriever(BM25Index.load(saved, mmap=False, backend="numpy"))
    for a, b in zip(numpy_backend.search(queries, 3), BM25Retriever(loaded).search(queries, 3)):
        assert a[0].document == b[0].document  # tie order among equal scores may differ between backends
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-6)


def test_build_from_corpus_file_records_fingerprint(bm25_dir, corpus_file, documents):
    manifest = Manifest.load(bm25_dir)
    assert manifest.method == "bm25" and manifest.count == len(documents)
    assert manifest.corpus_size == corpus_file.stat().st_size and len(manifest.corpus_sha256) == 64
    manifest.check_corpus(corpus_file)  # the same corpus passes


def test_load_retriever_dispatch(bm25_dir, tmp_path):
    retriever = load_retriever(bm25_dir, n_threads=1)
    assert isinstance(retriever, BM25Retriever) and retriever.n_threads == 1
    assert load_retriever(retriever) is retriever
    with pytest.raises(ValueError, match="neither an http"):
        load_retriever(tmp_path / "missing")
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_retriever(tmp_path)
    Manifest(method="colbert", count=1).save(tmp_path)
    with pytest.raises(ValueError, match="unknown index method 'colbert'"):
        load_retriever(tmp_path)


def test_empty_corpus_and_corrupt_index(tmp_path, bm25_dir):
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index.build([], tmp_path / "empty")
    manifest = Manifest.load(bm25_dir)
    manifest.count += 1
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(bm25_dir, bad)
    manifest.save(bad)
    with pytest.raises(ManifestError, match="corrupt"):
        BM25Index.load(bad)
