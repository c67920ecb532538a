"""The record/replay cache given batches with repeated queries (the G rollouts of a question often search the same
string in the same turn): every position gets the hits of its own query, in every mode, and the retriever is asked
each distinct query once."""

from __future__ import annotations

import pytest

from openrlhf_search.retrieval.cache import CachedRetriever
from openrlhf_search.retrieval.types import Document, Hit


class Echo:
    """A retriever whose hits name their query (so a mispairing is visible) and which logs every batch it gets."""

    fingerprint = "echo-index"

    def __init__(self):
        self.batches: list[list[str]] = []

    def search(self, queries, topk=3):
        self.batches.append(list(queries))
        return [[Hit(Document(f"{q}#{i}", f"passage {i} about {q}"), float(len(q) - i)) for i in range(topk)]
                for q in queries]


def _expected(queries, topk):
    return Echo().search(queries, topk)


BATCH = ["paris", "berlin", "paris", "paris", "rome", "berlin"]


def test_record_pairs_each_position_with_its_own_query_and_asks_each_distinct_query_once(tmp_path):
    inner = Echo()
    cached = CachedRetriever(inner, tmp_path / "c.sqlite", mode="record")
    assert cached.search(BATCH, 2) == _expected(BATCH, 2)
    assert inner.batches == [["paris", "berlin", "rome"]]


def test_replay_and_reuse_pair_duplicates_right(tmp_path):
    path = tmp_path / "c.sqlite"
    CachedRetriever(Echo(), path, mode="record").search(["rome", "berlin"], 2)
    replay = CachedRetriever(None, path, mode="replay")
    batch = ["berlin", "rome", "berlin", "rome", "rome"]
    assert replay.search(batch, 2) == _expected(batch, 2)
    # reuse: a mix of recorded (rome, berlin) and new (paris, oslo) queries, each repeated
    inner = Echo()
    reuse = CachedRetriever(inner, path, mode="reuse")
    batch = ["paris", "rome", "paris", "oslo", "berlin", "oslo", "rome", "paris"]
    assert reuse.search(batch, 2) == _expected(batch, 2)
    assert inner.batches == [["paris", "oslo"]]  # only the misses, once each
    stats = reuse.stats()
    assert (stats["lookups"], stats["hits"], stats["misses"]) == (4, 2, 2)  # distinct queries
    # what reuse stored replays with the right pairing
    batch = ["oslo", "paris", "oslo", "berlin"]
    assert CachedRetriever(None, path, mode="replay").search(batch, 2) == _expected(batch, 2)


@pytest.mark.parametrize("mode", ["record", "reuse"])
def test_bm25_through_the_cache_equals_bm25_on_a_batch_with_repeats(tmp_path, bm25_retriever, known_queries, mode):
    queries = list(known_queries)
    batch = [queries[i] for i in (0, 1, 0, 2, 1, 0, 3, 3)]
    direct = bm25_retriever.search(batch, 3)
    assert len({tuple(h.document.id for h in hits) for hits in direct}) == 4  # four distinct answers
    cached = CachedRetriever(bm25_retriever, tmp_path / "c.sqlite", mode=mode)
    assert cached.search(batch, 3) == direct
    assert CachedRetriever(None, tmp_path / "c.sqlite", mode="replay").search(batch[::-1], 3) == direct[::-1]
