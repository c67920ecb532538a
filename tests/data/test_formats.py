"""FlashRAG jsonl / Search-R1 parquet readers, writers, converter, and their error messages."""

import json

import pytest

from openrlhf_search.cli import main as cli_main
from openrlhf_search.data.formats import (
    DatasetFormatError,
    convert,
    read_corpus_jsonl,
    read_dataset,
    read_flashrag_jsonl,
    read_searchr1_parquet,
    write_flashrag_jsonl,
    write_searchr1_parquet,
)
from openrlhf_search.data.types import QASample

SAMPLES = [
    QASample("a1", "Who wrote Hamlet?", ["Shakespeare", "William Shakespeare"], "nq", metadata={"k": [1, 2]}),
    QASample("a2", "Year of the moon landing?", ["1969"], "hotpotqa"),
]


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_flashrag_roundtrip(tmp_path):
    path = write_flashrag_jsonl(SAMPLES, tmp_path / "d.jsonl")
    back = read_flashrag_jsonl(path)
    assert [(s.id, s.question, s.golden_answers, s.data_source) for s in back] == [
        (s.id, s.question, s.golden_answers, s.data_source) for s in SAMPLES
    ]
    assert back[0].metadata["k"] == [1, 2]


def test_searchr1_roundtrip_and_layout(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = write_searchr1_parquet(SAMPLES, tmp_path / "d.parquet", split="test")
    rows = pq.read_table(path).to_pylist()
    assert rows[0]["reward_model"] == {"style": "rule", "ground_truth": {"target": SAMPLES[0].golden_answers}}
    assert rows[0]["prompt"][-1]["role"] == "user" and "Who wrote Hamlet?" in rows[0]["prompt"][-1]["content"]
    assert rows[0]["data_source"] == "nq" and rows[1]["extra_info"]["split"] == "test"
    back = read_searchr1_parquet(path)
    assert [(s.id, s.question, s.golden_answers) for s in back] == [(s.id, s.question, s.golden_answers) for s in
                                                                    SAMPLES]
    assert back[0].metadata["k"] == [1, 2]


def test_searchr1_reader_recovers_question_from_prompt(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{
        "data_source": "nq",
        "prompt": [{"role": "user", "content": "Answer the given question. ... Question: who is the ceo of x?\n"}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": ["Alice"]}},
        "extra_info": {"split": "train", "index": 7},
    }]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    (s,) = read_searchr1_parquet(tmp_path / "s.parquet")
    assert (s.id, s.question, s.golden_answers, s.data_source) == ("nq-7", "who is the ceo of x?", ["Alice"], "nq")


def test_convert_both_ways_and_cli(tmp_path, capsys):
    src = write_flashrag_jsonl(SAMPLES, tmp_path / "a.jsonl")
    assert convert(src, tmp_path / "b.parquet") == 2
    assert convert(tmp_path / "b.parquet", tmp_path / "c.jsonl") == 2
    assert [s.golden_answers for s in read_dataset(tmp_path / "c.jsonl")] == [s.golden_answers for s in SAMPLES]
    assert cli_main(["data", "convert", "--input", str(src), "--output", str(tmp_path / "d.parquet")]) == 0
    assert "converted 2 rows" in capsys.readouterr().out
    assert cli_main(["data", "synth", "--out", str(tmp_path / "kb"), "--num-entities", "16", "--parquet"]) == 0
    assert (tmp_path / "kb" / "corpus.jsonl").exists() and (tmp_path / "kb" / "test.parquet").exists()
    assert cli_main(["data", "convert", "--input", str(tmp_path / "nope.jsonl"), "--output", "x.jsonl"]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "1", "question": "q", "golden_answers": ["a"]}', "{not json"], r"d.jsonl:2: invalid JSON"),
        (['{"id": "1", "golden_answers": ["a"]}'], r"d.jsonl:1: field 'question' is missing"),
        (['{"id": "1", "question": "q"}'], r"d.jsonl:1: field 'golden_answers' is missing"),
        (['{"id": "1", "question": "q", "golden_answers": 3}'], r"d.jsonl:1: field 'golden_answers' must be"),
        (['{"id": "1", "question": "q", "golden_answers": []}'], r"d.jsonl:1: field 'golden_answers' must be"),
        (["", '["a"]'], r"d.jsonl:2: expected a JSON object"),
        (['{"id": "1", "question": "q", "golden_answers": ["a"], "metadata": 5}'], r"d.jsonl:1: field 'metadata'"),
    ],
)
def test_flashrag_errors_name_file_and_line(tmp_path, lines, message):
    path = _write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DatasetFormatError, match=message):
        read_flashrag_jsonl(path)


def test_searchr1_errors_name_file_and_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = {"question": "q", "reward_model": {"style": "rule", "ground_truth": {"target": ["a"]}}}
    pq.write_table(pa.Table.from_pylist([good, {"question": "q2", "reward_model": None}]), tmp_path / "r.parquet")
    with pytest.raises(DatasetFormatError, match=r"r.parquet row 1: field 'reward_model.ground_truth.target'"):
        read_searchr1_parquet(tmp_path / "r.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "no marker", "golden_answers": ["a"]}]), tmp_path / "q.parquet")
    with pytest.raises(DatasetFormatError, match=r"q.parquet row 0: no question"):
        read_searchr1_parquet(tmp_path / "q.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetFormatError, match="bad.parquet: not a readable parquet file"):
        read_searchr1_parquet(tmp_path / "bad.parquet")


def test_dispatch_and_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match=r"d\.csv: cannot infer the dataset format"):
        read_dataset(tmp_path / "d.csv")
    with pytest.raises(KeyError, match="unknown dataset format 'csv'"):
        read_dataset(tmp_path / "d.jsonl", "csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_dataset(tmp_path / "missing.jsonl")
    path = _write_lines(tmp_path / "c.jsonl", [json.dumps({"id": 1, "title": "T", "text": "body"}),
                                                json.dumps({"id": 2})])
    with pytest.raises(DatasetFormatError, match=r"c.jsonl:2: field 'contents'"):
        read_corpus_jsonl(path)
    path = _write_lines(tmp_path / "c.jsonl", [json.dumps({"id": 1, "title": "T", "text": "body"})])
    (doc,) = read_corpus_jsonl(path)
    assert (doc.id, doc.title, doc.text) == ("1", "T", "body")
