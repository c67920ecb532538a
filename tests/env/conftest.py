"""Fixtures of the environment tests: a tiny local tokenizer, a tiny KB, an in-memory retriever, fake generations."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from openrlhf_search.data.synthetic import generate_kb
from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
from openrlhf_search.env.templates import QWEN_TOOLS_SYSTEM, SEARCH_R1_USER
from openrlhf_search.retrieval.types import Document, Hit


@pytest.fixture(scope="session")
def kb():
    return generate_kb(seed=3, n_entities=40)


@pytest.fixture(scope="session")
def tok(kb):
    texts = [d.contents for d in kb.corpus] + [s.question for s in kb.train] + [SEARCH_R1_USER, QWEN_TOOLS_SYSTEM]
    return build_tiny_tokenizer(texts * 2, vocab_size=800)


class FakeRetriever:
    """Word-overlap ranking over an in-memory corpus; records every call."""

    def __init__(self, docs: list[Document]):
        self.docs = docs
        self.calls: list[list[str]] = []

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        self.calls.append(list(queries))
        out = []
        for q in queries:
            words = set(q.lower().split())
            scored = [(len(words & set(d.contents.lower().replace('"', " ").split())), d) for d in self.docs]
            scored.sort(key=lambda x: -x[0])
            out.append([Hit(d, float(s)) for s, d in scored[:topk]])
        return out


@pytest.fixture
def retriever(kb):
    return FakeRetriever(kb.corpus)


@dataclass
class Gen:
    """What an engine returns for one prompt."""

    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"


@pytest.fixture
def gen(tok):
    """``gen(text)``: a generation whose ids are the tokenizer's encoding of ``text`` (log-prob -0.25 each)."""

    def make(text: str, ids: list[int] | None = None) -> Gen:
        ids = tok.encode(text, add_special_tokens=False) if ids is None else ids
        return Gen(ids, [-0.25] * len(ids))

    return make
