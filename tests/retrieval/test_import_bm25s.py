"""A FlashRAG bm25s index folder, imported with ``index --import-bm25s``, answers as FlashRAG's retriever does.

The folder is built as FlashRAG's ``flashrag/retriever/index_builder.py`` (``build_bm25_index_bm25s``) builds it,
re-implemented from a read of that function: bm25s' ``Tokenizer`` with English stop words and the English Snowball
stemmer, ``tokenize(..., return_as="tuple")``, ``bm25s.BM25(corpus=..., backend="numba")`` indexed and saved without
the corpus, the tokenizer's vocabulary and stop words saved in the same folder. The reference answers are bm25s'
``retrieve`` on that folder with its saved tokenizer, as FlashRAG's BM25 retriever queries it.
"""

from __future__ import annotations

import numpy as np
import pytest

from openrlhf_search.cli import main
from openrlhf_search.retrieval.bm25 import BM25Retriever
from openrlhf_search.retrieval.corpus import write_corpus_jsonl
from openrlhf_search.retrieval.integrity import check_index

bm25s = pytest.importorskip("bm25s")
Stemmer = pytest.importorskip("Stemmer")

# the last query's words occur in the corpus only in other inflections: only the right stemmer finds them
QUERIES = ["what is the capital of France", "highest mountain on Earth", "who wrote the tragedy Hamlet",
           "largest river by discharge", "bravo charlie item3", "capital city", "capitals of rivers"]
TOPK = 4


def flashrag_bm25s_folder(rows: list[dict], save_dir) -> None:
    save_dir.mkdir(parents=True)
    tokenizer = bm25s.tokenization.Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))
    corpus_tokens = tokenizer.tokenize([r["contents"] for r in rows], return_as="tuple", show_progress=False)
    retriever = bm25s.BM25(corpus=rows, backend="numba")
    retriever.index(corpus_tokens, show_progress=False)
    retriever.save(str(save_dir), corpus=None)
    tokenizer.save_vocab(str(save_dir))
    tokenizer.save_stopwords(str(save_dir))


def flashrag_answers(save_dir):
    searcher = bm25s.BM25.load(str(save_dir), load_corpus=False)
    tokenizer = bm25s.tokenization.Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english"))
    tokenizer.load_vocab(str(save_dir))
    tokenizer.load_stopwords(str(save_dir))
    tokens = tokenizer.tokenize(QUERIES, return_as="tuple", update_vocab=False, show_progress=False)
    return searcher.retrieve(tokens, k=TOPK, show_progress=False)


def test_imported_bm25s_folder_answers_as_flashrag(tmp_path, documents, capsys):
    rows = [d.to_json() for d in documents]
    corpus = tmp_path / "corpus.jsonl"
    write_corpus_jsonl(documents, corpus)
    flashrag_bm25s_folder(rows, tmp_path / "flashrag" / "bm25")
    out = tmp_path / "imported"
    argv = ["index", "--import-bm25s", str(tmp_path / "flashrag"), "--corpus", str(corpus), "--out", str(out),
            "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "bm25").is_symlink()
    check_index(out)  # what `serve` checks first
    their_rows, their_scores = flashrag_answers(tmp_path / "flashrag" / "bm25")
    ours = BM25Retriever.from_dir(out).search(QUERIES, TOPK)
    for query, hits, rows_i, scores_i in zip(QUERIES, ours, their_rows, their_scores):
        positive = scores_i > 0  # ours returns no zero-score passages
        np.testing.assert_allclose([h.score for h in hits], scores_i[positive], rtol=1e-5, err_msg=query)
        theirs = {float(s): set() for s in scores_i[positive]}
        for r, s in zip(rows_i[positive], scores_i[positive]):
            theirs[float(s)].add(rows[int(r)]["id"])
        for h in hits:  # the same passages at each score (ties may be ordered differently)
            assert h.document.id in theirs[float(np.float32(h.score))], query
    # a corpus that is not the indexed one is refused
    short = tmp_path / "short.jsonl"
    write_corpus_jsonl(documents[:-2], short)
    argv = ["index", "--import-bm25s", str(tmp_path / "flashrag"), "--corpus", str(short), "--out",
            str(tmp_path / "x"), "--quiet"]
    assert main(argv) == 2
    assert f"indexes {len(rows)} documents but --corpus {short} has {len(rows) - 2} rows" in capsys.readouterr().err
