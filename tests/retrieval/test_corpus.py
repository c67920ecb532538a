"""Corpus readers: both jsonl shapes, gzip, parquet, bad rows (raise with file+line / counted skip)."""

from __future__ import annotations

import gzip
import json

import pytest

from openrlhf_search.retrieval.corpus import (
    CorpusError,
    file_fingerprint,
    read_corpus,
    write_corpus_jsonl,
)
from openrlhf_search.retrieval.docstore import DocStore, DocStoreWriter
from openrlhf_search.retrieval.types import Document


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_contents_and_title_text_shapes(tmp_path):
    path = _write_lines(tmp_path / "c.jsonl", [
        json.dumps({"id": "a", "contents": '"Alpha"\nfirst passage'}),
        "",  # blank lines are ignored
        json.dumps({"id": 7, "title": "Beta", "text": "second passage"}),
        json.dumps({"text": "no title, no id"}),
    ])
    docs = list(read_corpus(path))
    assert docs == [
        Document("a", '"Alpha"\nfirst passage'),
        Document("7", '"Beta"\nsecond passage'),
        Document("2", "no title, no id"),  # missing id -> row number
    ]
    assert (docs[0].title, docs[0].text) == ("Alpha", "first passage")
    assert (docs[2].title, docs[2].text) == ("", "no title, no id")


def test_round_trip_through_writer_and_gzip(tmp_path, documents):
    plain = tmp_path / "c.jsonl"
    assert write_corpus_jsonl(documents, plain) == len(documents)
    assert list(read_corpus(plain)) == documents
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(plain.read_bytes())
    assert list(read_corpus(gz)) == documents


def test_parquet_streams_in_batches(tmp_path, documents):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": [d.id for d in documents], "title": [d.title for d in documents],
                      "text": [d.text for d in documents]})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=5)
    reader = read_corpus(path, batch_size=3)
    assert list(reader) == documents and reader.count == len(documents)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "x"}', "no 'contents' and no 'text'"),
        ('{"id": "x", "contents": 5}', "'contents' must be a string"),
        ('{"id": "x", "title": 3, "text": "t"}', "'title' must be a string"),
        ('{"id": ["x"], "contents": "c"}', "'id' must be a string or a number"),
    ],
)
def test_bad_row_raises_naming_file_and_line(tmp_path, line, reason):
    path = _write_lines(tmp_path / "bad.jsonl", ['{"id": "ok", "contents": "fine"}', "", line])
    with pytest.raises(CorpusError) as err:
        list(read_corpus(path))
    message = str(err.value)
    assert str(path) in message and "line 3" in message and reason in message


def test_bad_rows_skipped_and_counted(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", ['{"id": "a", "contents": "x"}', "{oops", "[]",
                                                 '{"id": "b", "contents": "y"}'])
    reader = read_corpus(path, on_error="skip")
    assert [d.id for d in reader] == ["a", "b"]
    assert reader.count == 2 and reader.skipped == 2
    assert "line 2" in reader.errors[0] and "line 3" in reader.errors[1]


def test_invalid_utf8_is_a_row_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "contents": "ok"}\n{"id": "b", "contents": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="line 2: not valid UTF-8"):
        list(read_corpus(path))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "c.csv").write_text("id,contents\n")
    with pytest.raises(CorpusError, match="unknown corpus format"):
        read_corpus(tmp_path / "c.csv")
    with pytest.raises(ValueError, match="on_error"):
        read_corpus(tmp_path / "c.csv", on_error="ignore")


def test_parquet_without_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["b"]}), path)
    with pytest.raises(CorpusError, match="no 'contents' or 'text' column"):
        list(read_corpus(path))


def test_fingerprint_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    fp = file_fingerprint(path, chunk_size=4096)
    assert fp.size == len(data) and fp.sha256 == hashlib.sha256(data).hexdigest()


def test_docstore_round_trip_unicode_and_empty(tmp_path):
    docs = [Document("é-1", '"Zürich"\nstraße ✓'), Document("", ""), Document("3", "plain")]
    with DocStoreWriter(tmp_path / "store") as writer:
        assert [writer.add(d) for d in docs] == [0, 1, 2]
    store = DocStore(tmp_path / "store")
    assert len(store) == 3 and list(store) == docs and store[-1] == docs[2]
    assert store.get_many([2, 0]) == [docs[2], docs[0]] and store[0:2] == docs[:2]
    with pytest.raises(IndexError):
        store[3]
    with pytest.raises(FileNotFoundError, match="not a document store"):
        DocStore(tmp_path)
