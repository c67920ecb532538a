"""Whole documents for the environment's ``open`` tool: ``get_documents`` in process, over ``POST /documents``."""

from __future__ import annotations

import httpx
import pytest

from openrlhf_search.retrieval.bm25 import BM25Config, BM25Index, BM25Retriever
from openrlhf_search.retrieval.client import HTTPRetriever, RetrieverRequestError
from openrlhf_search.retrieval.corpus import write_corpus_jsonl
from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig
from openrlhf_search.retrieval.types import Document

DOCS = [
    Document("a1", '"Paris"\nParis is the capital of France.'),
    Document("b1", '"Berlin"\nBerlin is the capital of Germany.'),
    Document("a2", '"Paris"\nIt lies on the Seine.'),  # a second chunk of the same article
    Document("n1", "A passage without a title line."),
]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    write_corpus_jsonl(DOCS, root / "corpus.jsonl")
    BM25Index.build(root / "corpus.jsonl", root / "index", config=BM25Config(), show_progress=False)
    return BM25Retriever(BM25Index.load(root / "index", backend="numpy"), n_threads=1)


def test_in_process_by_id_or_title_whole_document(retriever):
    by_id, by_title, second_chunk, untitled, missing = retriever.get_documents(
        ["a1", "  pARIS ", "a2", "n1", "Rome"])
    assert by_id == by_title == second_chunk  # every chunk of "Paris", in corpus order, as one document
    assert by_id.id == "a1" and by_id.title == "Paris"
    assert by_id.text == "Paris is the capital of France.\nIt lies on the Seine."
    assert untitled == DOCS[3] and missing is None
    assert retriever.get_documents(["Berlin"]) == [DOCS[1]]
    with pytest.raises(TypeError, match="list of ids or titles"):
        retriever.get_documents("a1")


def test_over_http_same_answers(retriever):
    keys = ["a1", "berlin", "Rome", "n1"]
    with RetrievalServer(retriever, ServerConfig(port=0)) as srv:
        client = HTTPRetriever(srv.url, retries=0)
        assert client.get_documents(keys) == retriever.get_documents(keys)
        assert client.get_documents([]) == []
        with pytest.raises(RetrieverRequestError, match="keys"):
            client._request("POST", "/documents", content=b'{"keys": "a1"}')
        r = httpx.post(srv.url + "/documents", content=b'{"keys": [1]}')
        assert r.status_code == 422 and "list of strings" in r.json()["detail"]


def test_retriever_without_documents_answers_501():
    class SearchOnly:
        def search(self, queries, topk=3):
            return [[] for _ in queries]

    with RetrievalServer(SearchOnly(), ServerConfig(port=0)) as srv:
        r = httpx.post(srv.url + "/documents", json={"keys": ["x"]})
        assert r.status_code == 501 and "cannot return whole documents" in r.json()["detail"]
