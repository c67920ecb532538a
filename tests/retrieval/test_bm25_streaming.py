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


@pytest.mark.parametrize("stemmer", ["english", None])
def test_one_shared_vocabulary_tokenizes_as_bm25s_full_files(tmp_path, stemmer):
    """Memory at wiki-18's vocabulary size: the build empties the tokenizer's word caches after every chunk (tiny
    chunks here) and a load reads ONE vocabulary map, shared by the model and the tokenizer, instead of bm25s' four.
    Query token ids, the model's known ids, the score arrays and the answers equal those of bm25s' own tokenizer
    (complete caches) and its in-memory index; the tokenizer file loads in bm25s and tokenizes as that tokenizer."""
    from openrlhf_search.retrieval.bm25 import BM25Retriever
    from openrlhf_search.retrieval.types import Document

    texts = _corpus(600) + ["running runners ran quickly", "Café naïve 東京 straße", ""]
    config = BM25Config(stemmer=stemmer, chunk_size=37)
    index = BM25Index.build([Document(str(i), t) for i, t in enumerate(texts)], tmp_path / "idx", config=config)
    bm25s_tok = make_tokenizer(config)  # bm25s alone: one pass, caches kept
    reference = bm25s.BM25(k1=config.k1, b=config.b, method="lucene")
    reference.index((bm25s_tok.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False),
                     bm25s_tok.get_vocab_dict()), show_progress=False)
    for key in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(np.asarray(index.model.scores[key]), reference.scores[key], err_msg=key)
    from_file = make_tokenizer(config)  # our tokenizer file, read by bm25s
    from_file.load_vocab(str(tmp_path / "idx" / "tokenizer"))
    assert from_file.get_vocab_dict() == bm25s_tok.get_vocab_dict()
    lean = index.tokenizer.get_vocab_dict()
    assert lean is index.model.vocab_dict and lean == reference.vocab_dict  # one map, the full one's content
    assert set(index.model.unique_token_ids_set) == reference.unique_token_ids_set
    queries = [*texts[:40], "runs", "running Seine", "unknownword capital", "東京", "naive cafe STRASSE"]
    lean_ids = index.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    assert lean_ids == bm25s_tok.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    assert lean_ids == from_file.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    reloaded = BM25Index.load(tmp_path / "idx")  # twice: the first queries filled the word caches of the first
    hits = BM25Retriever(index).search(queries, 5)
    assert hits == BM25Retriever(reloaded).search(queries, 5)
    retriever = BM25Retriever(reloaded)
    live = [q for q in retriever.tokenize(queries) if q]
    assert len(live) >= 40
    docs, scores = retriever._retrieve(live, 5)
    ref = reference.retrieve(live, k=5, show_progress=False, return_as="tuple")
    np.testing.assert_array_equal(scores, ref.scores)
    np.testing.assert_array_equal(np.where(scores > 0, docs, -1), np.where(ref.scores > 0, ref.documents, -1))


@pytest.mark.parametrize("n", [0, 1, 7, 9])
def test_json_object_written_a_slice_at_a_time_is_json_dumps(tmp_path, n):
    import io

    from openrlhf_search.retrieval.bm25 import write_json_object

    d = {f"t\u00e9rm{i}\"\\": i for i in range(n)}
    buf = io.StringIO()
    write_json_object(buf, d.items(), slice_size=3)
    assert json.loads(buf.getvalue()) == d and buf.getvalue() == json.dumps(d, ensure_ascii=False)
