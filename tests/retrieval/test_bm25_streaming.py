"""The bounded-memory BM25 builder writes exactly the arrays bm25s' in-memory ``index`` computes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from openrlhf_search.retrieval.bm25 import BM25Config, BM25Index, build_scores_streaming, make_tokenizer

bm25s = pytest.importorskip("bm25s")


def _corpus(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(4000)] + "the capital of France river Seine mountain".split()
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf-like: frequent and rare terms, long columns
    docs = [" ".join(rng.choices(words, weights, k=rng.randint(1, 120))) for _ in range(n)]
    docs[17] = ""  # an empty passage, and one of stop words only
    docs[18] = "the of and"
    return docs


@pytest.mark.parametrize(("k1", "b", "chunk", "bucket"), [(0.9, 0.4, 256, 5_000), (1.5, 0.75, 10_000, 10**9)])
def test_streaming_scores_equal_bm25s(tmp_path, k1, b, chunk, bucket):
    config = BM25Config(k1=k1, b=b)
    texts = _corpus()
    tokenizer = make_tokenizer(config)
    ids = tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
    vocab = dict(tokenizer.get_vocab_dict())
    reference = bm25s.BM25(k1=k1, b=b, method="lucene")
    reference.index((ids, dict(vocab)), show_progress=False)
    chunks = (ids[i : i + chunk] for i in range(0, len(ids), chunk))
    n = build_scores_streaming(chunks, dict(vocab), config, tmp_path / "out", tmp_path / "tmp", bucket_entries=bucket)
    assert n == len(texts) and not (tmp_path / "tmp").exists()  # temporary files removed
    for key in ("data", "indices", "indptr"):
        got = np.load(tmp_path / "out" / f"{key}.csc.index.npy")
        want = reference.scores[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    saved = json.loads((tmp_path / "out" / "vocab.index.json").read_text(encoding="utf-8"))
    assert saved == reference.vocab_dict
    params = json.loads((tmp_path / "out" / "params.index.json").read_text())
    assert params["num_docs"] == len(texts) and params["k1"] == k1 and params["b"] == b


def test_index_built_in_bounded_memory_answers_as_before(tmp_path):
    texts = _corpus(800)
    from openrlhf_search.retrieval.types import Document

    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    index = BM25Index.build(docs, tmp_path / "idx")
    reference = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    tokenizer = make_tokenizer(BM25Config())
    reference.index((tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False),
                     tokenizer.get_vocab_dict()), show_progress=False)
    np.testing.assert_array_equal(np.asarray(index.model.scores["data"]), reference.scores["data"])
    from openrlhf_search.retrieval.bm25 import BM25Retriever

    hits = BM25Retriever(index).search(["capital of France", "w3 w7"], 3)
    assert all(len(h) == 3 for h in hits)
