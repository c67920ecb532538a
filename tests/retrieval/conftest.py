"""Shared fixtures: a small corpus written by the tests, with known answers, and a BM25 index over it."""

from __future__ import annotations

import random

import pytest

from openrlhf_search.retrieval.corpus import write_corpus_jsonl
from openrlhf_search.retrieval.types import Document

FACTS = [
    ("paris", "Paris", "Paris is the capital and most populous city of France, on the river Seine."),
    ("berlin", "Berlin", "Berlin is the capital of Germany and its largest city by population."),
    ("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("hamlet", "Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("python", "Python (programming language)", "Python is a programming language created by Guido van Rossum."),
    ("photosynthesis", "Photosynthesis", "Photosynthesis converts light energy into chemical energy in plants."),
    ("amazon", "Amazon River", "The Amazon River in South America is the largest river by discharge volume."),
    ("jupiter", "Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System."),
]

# query -> id of the passage that must be ranked first
KNOWN_QUERIES = {
    "what is the capital of France": "paris",
    "capital city of Germany": "berlin",
    "highest mountain on Earth": "everest",
    "who wrote the tragedy Hamlet": "hamlet",
    "who created the Python programming language": "python",
    "how do plants convert light into chemical energy": "photosynthesis",
    "largest river by discharge": "amazon",
    "largest planet in the Solar System": "jupiter",
}

FILLER_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()


def make_documents(n_filler: int = 40) -> list[Document]:
    """The facts plus deterministic filler passages (so idf is meaningful), in a fixed order."""
    docs = [Document(doc_id, f'"{title}"\n{text}') for doc_id, title, text in FACTS]
    rng = random.Random(0)
    for i in range(n_filler):
        words = rng.choices(FILLER_WORDS, k=rng.randint(6, 16))
        docs.append(Document(f"filler-{i}", f'"Filler {i}"\n' + " ".join(words) + f" item{i}"))
    return docs


@pytest.fixture(scope="session")
def documents() -> list[Document]:
    return make_documents()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_corpus_jsonl(documents, path)
    return path


@pytest.fixture(scope="session")
def bm25_dir(tmp_path_factory, corpus_file):
    from openrlhf_search.retrieval.bm25 import BM25Index

    out = tmp_path_factory.mktemp("index") / "bm25"
    BM25Index.build(corpus_file, out)
    return out


@pytest.fixture(scope="session")
def bm25_retriever(bm25_dir):
    from openrlhf_search.retrieval.bm25 import BM25Retriever

    return BM25Retriever.from_dir(bm25_dir)


@pytest.fixture(scope="session")
def known_queries() -> dict[str, str]:
    """query -> id of the passage that must rank first."""
    return dict(KNOWN_QUERIES)
