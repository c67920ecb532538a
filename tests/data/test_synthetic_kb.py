"""The synthetic KB: deterministic, disjoint splits, answers only in the corpus and retrievable with BM25."""

import re

import pytest

from openrlhf_search.data.synthetic import (
    fresh_worlds,
    generate_kb,
    load_kb_dir,
    name_words,
    synthetic_trajectories,
    write_kb,
)
from openrlhf_search.env.actions import parse_action
from openrlhf_search.rewards import extract_answer, is_valid_format, normalize_answer


@pytest.fixture(scope="module")
def kb():
    return generate_kb(seed=11, n_entities=80)


def test_deterministic(kb):
    again = generate_kb(seed=11, n_entities=80)
    assert again.corpus == kb.corpus and again.train == kb.train and again.test == kb.test
    other = generate_kb(seed=12, n_entities=80)
    assert other.corpus != kb.corpus


def test_shapes_and_passage_length(kb):
    assert len({d.id for d in kb.corpus}) == len(kb.corpus)
    assert len({s.id for s in kb.train + kb.test}) == len(kb.train) + len(kb.test)
    lengths = [len(d.text.split()) for d in kb.corpus]
    assert 25 <= min(lengths) and max(lengths) <= 60
    hops = [s.metadata["hops"] for s in kb.train]
    assert 0.3 < hops.count(2) / len(hops) < 0.5  # two_hop_fraction=0.4
    assert all(d.title and d.contents.startswith(f'"{d.title}"\n') for d in kb.corpus)


def test_train_and_test_worlds_are_disjoint(kb):
    split_of = {e["id"]: e["split"] for ents in kb.entities.values() for e in ents}
    name_split = {e["name"]: e["split"] for ents in kb.entities.values() for e in ents}
    for split in ("train", "test"):
        for s in getattr(kb, split):
            assert {split_of[d] for d in s.metadata["supporting_doc_ids"]} == {split}
            assert name_split[s.metadata["subject"]] == split
            if s.golden_answers[0] in name_split:  # names (not years) belong to the same world
                assert name_split[s.golden_answers[0]] == split
    assert not {s.metadata["subject"] for s in kb.train} & {s.metadata["subject"] for s in kb.test}


def test_fresh_worlds_share_no_name_word_with_the_base_world(kb):
    """Warm-start demonstrations come from these worlds: no base-world fact or name may leak into them."""
    worlds = fresh_worlds(kb, 2, n_entities=40, seed=500)
    base_words = {w.lower() for w in name_words(kb)}
    assert len(base_words) > 100  # every person has a first and a last name word, cities a river, ...
    company_suffixes = {"works", "group", "labs", "company"}
    for w in worlds:
        assert not ({x.lower() for x in name_words(w)} - company_suffixes) & base_words
        base_text = " ".join(d.contents for d in kb.corpus)
        assert all(s.golden_answers[0] not in base_text for s in w.train if not s.golden_answers[0].isdigit())
    assert worlds[0].corpus != worlds[1].corpus
    assert fresh_worlds(kb, 1, n_entities=40, seed=500)[0].corpus == worlds[0].corpus  # deterministic


def test_answers_only_in_the_corpus(kb):
    docs = kb.doc_by_id()
    for s in kb.train + kb.test:
        ans = s.golden_answers[0]
        support = [docs[d].contents for d in s.metadata["supporting_doc_ids"]]
        assert ans in support[-1]  # the last hop's passage states the answer
        assert normalize_answer(ans) not in normalize_answer(s.question)
        if s.metadata["hops"] == 2:
            assert s.metadata["bridge"] in support[0]


def _bm25(corpus):
    bm25s = pytest.importorskip("bm25s")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([d.contents for d in corpus], stopwords="en", show_progress=False),
                    show_progress=False)
    return bm25s, retriever


def test_answers_retrievable_with_bm25(kb):
    bm25s, retriever = _bm25(kb.corpus)
    samples = kb.train + kb.test

    def top3(queries):
        idx, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=3,
                                    show_progress=False)
        return [{kb.corpus[j].id for j in row} for row in idx]

    first = top3([s.question for s in samples])
    hop1 = [s.metadata["supporting_doc_ids"][0] in got for s, got in zip(samples, first)]
    two = [s for s in samples if s.metadata["hops"] == 2]
    second = top3([f"{s.metadata['bridge']} {re.sub(r'[?]', '', s.question)}" for s in two])
    hop2 = [s.metadata["supporting_doc_ids"][1] in got for s, got in zip(two, second)]
    assert sum(hop1) / len(hop1) >= 0.95, sum(hop1) / len(hop1)
    assert sum(hop2) / len(hop2) >= 0.9, sum(hop2) / len(hop2)


def test_write_and_reload(tmp_path, kb):
    paths = write_kb(kb, tmp_path)
    assert set(paths) == {"corpus", "train", "test"}
    corpus, train, test = load_kb_dir(tmp_path)
    assert corpus == kb.corpus
    assert [s.golden_answers for s in train] == [s.golden_answers for s in kb.train]
    assert train[0].metadata["supporting_doc_ids"] == kb.train[0].metadata["supporting_doc_ids"]
    assert len(test) == len(kb.test)


def test_demonstrations(kb):
    good = synthetic_trajectories(kb, "train", n=30, mistake_rate=0.0, seed=1)
    assert all(d.correct for d in good)
    for d in good:
        assert is_valid_format(d.text), d.text
        assert extract_answer(d.text) == d.sample.golden_answers[0]
        model = [t for t, is_model in d.segments if is_model]
        assert len(model) == d.sample.metadata["hops"] + 1
        assert [parse_action(t).kind for t in model] == ["search"] * (len(model) - 1) + ["answer"]
        obs = [t for t, is_model in d.segments if not is_model]
        assert all(t.startswith("\n\n<information>Doc 1") for t in obs)
    bad = synthetic_trajectories(kb, "train", n=30, mistake_rate=1.0, seed=1)
    assert not any(d.correct for d in bad)
    mixed = synthetic_trajectories(kb, "train", n=200, mistake_rate=0.25, seed=2)
    assert 0.15 < sum(not d.correct for d in mixed) / 200 < 0.35
    assert synthetic_trajectories(kb, "train", n=5, seed=3)[0].text == synthetic_trajectories(kb, "train", n=5,
                                                                                              seed=3)[0].text


def test_generate_kb_argument_errors():
    with pytest.raises(ValueError, match="n_entities=3"):
        generate_kb(n_entities=3)
    with pytest.raises(ValueError, match="test_fraction"):
        generate_kb(test_fraction=1.0)
