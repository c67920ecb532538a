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


def _corpus_queries(documents, n: int = 60, seed: int = 1) -> list[str]:
    """Queries of 1-5 words drawn from the corpus (plus an unknown word and a stop-word-only query)."""
    import random

    rng = random.Random(seed)
    words = [w for d in documents for w in d.contents.replace('"', " ").split()]
    return [" ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(n)] + ["zzzunknownzzz", "the of and"]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_direct_kernel_call_equals_bm25s_retrieve(bm25_dir, documents, n_threads):
    """Our call of bm25s' scoring kernel (no argument checks, positional dispatch, no progress bar) returns exactly
    what ``bm25s.BM25.retrieve`` and ``Tokenizer.tokenize`` return, serial and parallel."""
    retriever = BM25Retriever(BM25Index.load(bm25_dir), n_threads=n_threads)
    model, tokenizer = retriever.index.model, retriever.index.tokenizer
    queries = _corpus_queries(documents)
    reference = tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    empty = tokenizer.get_vocab_dict().get("")
    tokens = retriever.tokenize(queries)
    assert tokens == [[t for t in q if t != empty] for q in reference]
    live = [q for q in tokens if q]
    assert len(live) < len(queries)  # the unknown and stop-word queries have no token
    for k in (1, 3, 7):
        docs, scores = retriever._retrieve(live, k)
        ref = model.retrieve(live, k=k, show_progress=False, n_threads=n_threads, return_as="tuple")
        np.testing.assert_array_equal(docs, ref.documents)
        np.testing.assert_array_equal(scores, ref.scores)


def test_serial_and_parallel_kernels_get_their_own_numba_cache_file():
    """bm25s builds both kernels from one Python function; numba names a cache file after the function, so plain
    ``enable_caching()`` gave both the same file (planted below: the default names collide) and the serial path
    loaded the OpenMP kernel. Ours names each file after its kernel."""
    from bm25s.numba import retrieve_utils
    from numba.core.caching import FunctionCache

    from openrlhf_search.retrieval.bm25 import enable_numba_cache

    serial = retrieve_utils._retrieve_internal_jitted_serial
    parallel = retrieve_utils._retrieve_internal_jitted_parallel
    # the mistake: numba's default cache for the two dispatchers is one and the same index file
    default_names = {FunctionCache(d.py_func)._cache_file._index_name for d in (serial, parallel)}
    assert len(default_names) == 1
    assert enable_numba_cache()
    names = {d._cache._cache_file._index_name for d in (serial, parallel)}
    assert len(names) == 2 and any("serial" in n for n in names) and any("parallel" in n for n in names)


def test_one_thread_never_starts_the_openmp_pool_even_after_the_parallel_kernel_was_cached(tmp_path, bm25_dir):
    """Behaviour, in fresh processes sharing one numba cache: a process that ran the parallel kernel caches it; a
    later process with ``n_threads=1`` must run the serial kernel, so numba's threading layer is never launched
    (with the shared cache file it loaded the parallel kernel and started a thread pool on every core)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONWARNINGS": "ignore"}
    script = (
        "import sys; from numba.np.ufunc import parallel\n"
        "from openrlhf_search.retrieval.bm25 import BM25Index, BM25Retriever\n"
        f"r = BM25Retriever(BM25Index.load({str(bm25_dir)!r}), n_threads=int(sys.argv[1]))\n"
        "r.search(['capital of France', 'highest mountain'], 3)\n"
        "print('pool', parallel._is_initialized)\n"
    )
    first = subprocess.run([sys.executable, "-c", script, "2"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "pool True" in first.stdout  # the parallel kernel ran (and is now in the cache)
    second = subprocess.run([sys.executable, "-c", script, "1"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "pool False" in second.stdout
