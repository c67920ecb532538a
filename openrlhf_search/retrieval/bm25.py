"""BM25 retrieval on bm25s: sparse, pre-scored, memory-mapped, batched.

bm25s (Lù, 2024, arXiv 2407.03618) computes every BM25 term weight at index time,

    w(t, d) = idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)  = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

(the Lucene variant, Kamphuis et al. 2020, without the rank-neutral ``k1 + 1`` factor; ``|d|`` counts tokens after
stop-word removal) and stores them in a CSC sparse matrix ``[vocab, docs]``; a query's scores are the sum of a few
sparse columns and top-k is a partial sort. That replaces the per-query Lucene calls of Search-R1's Pyserini
server. We add:

* streaming build: the corpus is read once; texts go to an on-disk :class:`DocStore` while they are tokenized in
  chunks (only the token ids, as bm25s needs them, are held in memory during the build);
* the fastest backend installed: numba (multi-threaded over the queries of a batch) when available, else numpy;
* memory-mapped loading of the score matrix and of the passages;
* queries with no known term return no hits (bm25s would otherwise score its empty-token placeholder).

Defaults ``k1=0.9, b=0.4`` are Anserini/Pyserini's, i.e. what Search-R1's BM25 baseline used.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import CorpusReader, read_corpus
from .docstore import DocStore, DocStoreWriter, spill_documents, store_documents
from .inprocess import IndexDirectory, InProcessRetriever
from .manifest import Manifest, ManifestError
from .types import Document

STEMMERS = ("english", None)
STOPWORDS = ("en", None)
BACKENDS = ("auto", "numba", "numpy")


@dataclass
class BM25Config:
    """Parameters of a BM25 index (saved in the manifest's ``params``)."""

    k1: float = 0.9
    """Term-frequency saturation (Anserini default 0.9)."""
    b: float = 0.4
    """Document-length normalisation (Anserini default 0.4)."""
    method: str = "lucene"
    """bm25s scoring variant: ``lucene``, ``robertson``, ``atire``, ``bm25l``, ``bm25+``."""
    stemmer: str | None = "english"
    """Snowball stemmer language (PyStemmer) or ``None`` for no stemming."""
    stopwords: str | None = "en"
    """Stop-word list (bm25s' ``en``) or ``None`` to keep every token."""
    lower: bool = True
    """Lower-case before tokenizing."""
    chunk_size: int = 20_000
    """Documents tokenized per chunk while building (bounds the transient text held in memory)."""

    def __post_init__(self) -> None:
        if self.stemmer not in STEMMERS:
            raise ValueError(f"stemmer must be one of {STEMMERS}, got {self.stemmer!r}")
        if self.stopwords not in STOPWORDS:
            raise ValueError(f"stopwords must be one of {STOPWORDS}, got {self.stopwords!r}")


def make_tokenizer(config: BM25Config):
    """A bm25s ``Tokenizer`` with the configured stemmer / stop words (empty vocabulary)."""
    import bm25s

    stemmer = None
    if config.stemmer is not None:
        import Stemmer

        stemmer = Stemmer.Stemmer(config.stemmer)
    return bm25s.tokenization.Tokenizer(lower=config.lower, stopwords=config.stopwords or [], stemmer=stemmer)


@functools.cache
def enable_numba_cache() -> bool:
    """Cache bm25s' numba kernels on disk, one cache file per kernel.

    bm25s compiles its retrieval kernels without ``cache=True``, which costs every new process 5-8 s of JIT on its
    first query (a server start, each test process). Caching them makes later processes load the machine code in
    ~0.2 s. bm25s builds its serial and its parallel kernel from ONE Python function, and numba names a cache file
    after the function (not after the compile flags): with plain ``enable_caching()`` both dispatchers shared one
    file, whichever compiled first was loaded by the other, and ``n_threads=1`` silently ran the OpenMP kernel on
    every core (found by a per-thread CPU profile; ``tests/retrieval/test_bm25.py`` pins the fix). Each dispatcher
    therefore gets a cache named after its own kernel. Numba writes next to bm25s or, if that is read-only, to its
    user-wide cache directory (``NUMBA_CACHE_DIR`` overrides). Returns False if bm25s' or numba's internals moved.
    """
    try:
        from bm25s.numba import retrieve_utils
        from numba.core.caching import CompileResultCacheImpl, FunctionCache

        for name in ("_retrieve_internal_jitted_parallel", "_retrieve_internal_jitted_serial"):
            dispatcher = getattr(retrieve_utils, name)
            dispatcher._cache = _kernel_cache(FunctionCache, CompileResultCacheImpl, dispatcher.py_func, name)
    except (ImportError, AttributeError):
        return False
    return True


def _kernel_cache(cache_class, impl_class, py_func, tag: str):
    """A numba ``FunctionCache`` for ``py_func`` whose files carry ``tag`` (one file per compiled kernel)."""

    class TaggedImpl(impl_class):
        def get_filename_base(self, fullname, abiflags):
            return super().get_filename_base(f"{fullname}-{tag}", abiflags)

    class TaggedCache(cache_class):
        _impl_class = TaggedImpl

    return TaggedCache(py_func)


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``numba`` if numba imports, else ``numpy``; enables the numba kernel cache when used."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        import bm25s

        backend = "numba" if bm25s.NUMBA_AVAILABLE else "numpy"
    if backend == "numba":
        enable_numba_cache()
    return backend


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class BM25Index(IndexDirectory):
    """A bm25s score matrix + its tokenizer + the passages (a :class:`DocStore`), saved under one directory.

    Layout: ``manifest.json``, ``bm25/`` (bm25s arrays), ``tokenizer/`` (vocabulary, stop words), ``docs/``.
    """

    def __init__(self, model, tokenizer, docs: DocStore, config: BM25Config, directory: Path, manifest: Manifest):
        self.model = model
        self.tokenizer = tokenizer
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
        stemmer: str | None = "english",
        stopwords: str | None = "en",
        config: BM25Config | None = None,
        backend: str = "auto",
        on_error: str = "raise",
        show_progress: bool = False,
    ) -> BM25Index:
        """Index documents (an iterable, or a corpus file path read with :func:`read_corpus`).

        Args:
            docs: :class:`Document` objects, or the path of a jsonl/parquet corpus (then its fingerprint is recorded).
            out_dir: where to write the index; ``None`` -> a temporary directory removed with the object.
            stemmer / stopwords: shortcuts for the :class:`BM25Config` fields (ignored when ``config`` is given).
            config: full parameters.
            backend: retrieval backend of the returned index (``auto``: numba if installed).
            on_error: corpus bad-row policy when ``docs`` is a path.
            show_progress: tqdm bars for reading/tokenizing and for bm25s' scoring.
        """
        import bm25s
        from tqdm.auto import tqdm

        config = config or BM25Config(stemmer=stemmer, stopwords=stopwords)
        temporary = out_dir is None
        directory = Path(tempfile.mkdtemp(prefix="bm25-")) if temporary else Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        reader = read_corpus(docs, on_error=on_error) if isinstance(docs, (str, os.PathLike)) else None
        source: Iterable[Document] = reader if reader is not None else docs
        tokenizer = make_tokenizer(config)
        ids: list[list[int]] = []
        total = len(source) if hasattr(source, "__len__") else None
        if config.method in STREAMING_METHODS:  # bounded memory: see build_scores_streaming
            with DocStoreWriter(directory / "docs") as writer, tqdm(
                total=total, desc="bm25: read+tokenize", unit="doc", disable=not show_progress, smoothing=0.1
            ) as bar:
                def token_chunks():
                    for chunk in _chunks(spill_documents(source, writer), config.chunk_size):
                        yield tokenizer.tokenize(chunk, update_vocab=True, return_as="ids", show_progress=False)
                        drop_word_caches(tokenizer)
                        bar.update(len(chunk))

                try:
                    n_docs = build_scores_streaming(token_chunks(), tokenizer.get_vocab_dict, config,
                                                    directory / "bm25", directory / "bm25.tmp")
                except ValueError as exc:
                    if "empty corpus" in str(exc):
                        raise ValueError(f"cannot build a BM25 index from an empty corpus "
                                         f"({docs if reader else 'no documents'})") from None
                    raise
            manifest = Manifest(method="bm25", count=n_docs, params=dataclasses.asdict(config))
            if reader is not None:
                manifest.set_corpus(reader.path)
                manifest.skipped = reader.skipped
            save_tokenizer_vocab(tokenizer, directory / "tokenizer")
            tokenizer.save_stopwords(str(directory / "tokenizer"))
            manifest.save(directory)
            tokenizer = None  # the vocabulary is the largest object here: never hold two copies (load reads one)
            index = cls.load(directory, backend=backend)
            if temporary:
                weakref.finalize(index, shutil.rmtree, str(directory), True)
            return index
        with DocStoreWriter(directory / "docs") as writer, tqdm(
            total=total, desc="bm25: read+tokenize", unit="doc", disable=not show_progress, smoothing=0.1
        ) as bar:
            for chunk in _chunks(spill_documents(source, writer), config.chunk_size):
                ids.extend(tokenizer.tokenize(chunk, update_vocab=True, return_as="ids", show_progress=False))
                bar.update(len(chunk))
        if not ids:
            raise ValueError(f"cannot build a BM25 index from an empty corpus ({docs if reader else 'no documents'})")
        model = bm25s.BM25(k1=config.k1, b=config.b, method=config.method, backend=resolve_backend(backend))
        model.index((ids, tokenizer.get_vocab_dict()), show_progress=show_progress)
        del ids
        manifest = Manifest(method="bm25", count=int(model.scores["num_docs"]), params=dataclasses.asdict(config))
        if reader is not None:
            manifest.set_corpus(reader.path)
            manifest.skipped = reader.skipped
        index = cls(model, tokenizer, DocStore(directory / "docs"), config, directory, manifest)
        index._write(directory)
        if temporary:
            weakref.finalize(index, shutil.rmtree, str(directory), True)
        return index

    def _write(self, directory: Path) -> None:
        self.model.save(str(directory / "bm25"), show_progress=False)
        save_tokenizer_vocab(self.tokenizer, directory / "tokenizer")
        self.tokenizer.save_stopwords(str(directory / "tokenizer"))
        self.manifest.save(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True, backend: str = "auto") -> BM25Index:
        """Load an index written by :meth:`build`/:meth:`save`; ``mmap`` maps the score arrays (no read into RAM)."""
        import bm25s

        directory = Path(directory)
        manifest = Manifest.load(directory)
        if manifest.method != "bm25":
            raise ManifestError(f"{directory}: manifest method is {manifest.method!r}, not 'bm25'")
        fields = {f.name for f in dataclasses.fields(BM25Config)}
        config = BM25Config(**{k: v for k, v in manifest.params.items() if k in fields})
        # An index built here has ONE vocabulary: bm25s' ``vocab.index.json`` is the tokenizer's term -> id map (plus
        # the empty token). It is read once and shared by the model and the tokenizer, whose word -> stem / word ->
        # id maps are caches it refills from queries. Loading bm25s' and the tokenizer's files as they are would
        # hold four maps of the whole vocabulary and a set of its ids (several GB at wiki-18's ~20M types).
        # Imported bm25s folders keep the full load (their two files need not agree).
        lean = "imported_from" not in manifest.params
        model = bm25s.BM25.load(str(directory / "bm25"), mmap=mmap, backend=resolve_backend(backend),
                                show_progress=False, load_corpus=False, load_vocab=not lean)
        if lean:
            from bm25s.utils import json_functions

            vocab = json_functions.loads((directory / "bm25" / "vocab.index.json").read_bytes())
            model.vocab_dict = vocab
            # ids are 0..n-1 in every index built here; a range answers ``id in ...`` as the set of ids did
            model.unique_token_ids_set = (range(len(vocab)) if not vocab or max(vocab.values()) == len(vocab) - 1
                                          else set(vocab.values()))
        if mmap:
            # bm25s maps the arrays read-only (mmap_mode="r"); numba's kernels run ~10-30x slower on read-only
            # arrays (measured here on 100k passages: 3-11 ms vs 0.3 ms per single-query call). A copy-on-write
            # mapping (mode "c", never written) is just as lazy and shared with the page cache, and fast.
            for key in ("data", "indices", "indptr"):
                name = f"{key}.csc.index.npy"
                if isinstance(model.scores.get(key), np.ndarray) and (directory / "bm25" / name).is_file():
                    model.scores[key] = np.load(directory / "bm25" / name, mmap_mode="c").view(np.ndarray)
        tokenizer = make_tokenizer(config)
        if lean:
            if config.stemmer is None:
                tokenizer.word_to_id = vocab
            else:
                tokenizer.stem_to_sid = vocab
        else:
            tokenizer.load_vocab(str(directory / "tokenizer"))
        docs = DocStore(directory / "docs")
        if len(docs) != manifest.count or model.scores["num_docs"] != manifest.count:
            raise ManifestError(f"{directory}: manifest says {manifest.count} passages, the store has {len(docs)} and "
                                f"the score matrix {model.scores['num_docs']}; the index is corrupt, rebuild it")
        return cls(model, tokenizer, docs, config, directory, manifest)


class BM25Retriever(InProcessRetriever):
    """In-process BM25 retriever over a :class:`BM25Index`; one ``search`` call scores a whole batch.

    With numba, a call runs bm25s' own scoring kernel directly: its serial kernel for ``n_threads=1``, else its
    OpenMP kernel on ``n_threads`` threads. ``bm25s.BM25.retrieve`` around the same kernel spent ~160 us per call
    on argument checks and numba's keyword-argument dispatch, and its tokenizer ~40 us on a (disabled) progress bar:
    more than scoring one query costs (~190 us on 100k passages). ``tests/retrieval/test_bm25.py`` pins this path
    to ``bm25s.BM25.retrieve`` (same documents, same scores). Thread-safe: concurrent callers are serialised by a
    lock.
    """

    def __init__(self, index: BM25Index, n_threads: int = 0):
        self.index = index
        self.docs = index.docs
        self.n_threads = n_threads or (os.cpu_count() or 1)
        self._empty_id = index.tokenizer.get_vocab_dict().get("")
        self._known = getattr(index.model, "unique_token_ids_set", None) or set(index.model.vocab_dict.values())
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, mmap: bool = True, n_threads: int = 0, **_) -> BM25Retriever:
        return cls(BM25Index.load(directory, mmap=mmap), n_threads=n_threads)

    def tokenize(self, queries: list[str]) -> list[list[int]]:
        """Token ids of each query in the index vocabulary; unknown words and the empty token are dropped."""
        stream = self.index.tokenizer.streaming_tokenize(queries, update_vocab=False)
        empty, known = self._empty_id, self._known
        return [[t for t in q if t != empty and t in known] for q in stream]

    def _retrieve(self, token_ids: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(documents, scores)``, both ``[len(token_ids), k]``, of non-empty token lists (bm25s' kernel or numpy)."""
        model = self.index.model
        if model.backend != "numba":
            res = model.retrieve(token_ids, k=k, show_progress=False, n_threads=self.n_threads, return_as="tuple")
            return res.documents, res.scores
        import numba
        from bm25s.numba import retrieve_utils

        int_dtype = np.dtype(model.int_dtype)
        pointers = np.cumsum([0, *map(len, token_ids)], dtype=int_dtype)
        flat = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=int_dtype, count=int(pointers[-1]))
        s = model.scores
        args = (flat, pointers, k, True, np.dtype(model.dtype), int_dtype, s["data"], s["indptr"], s["indices"],
                s["num_docs"], getattr(model, "nonoccurrence_array", None), None)
        if self.n_threads == 1:
            scores, documents = retrieve_utils._retrieve_internal_jitted_serial(*args)
        else:
            before = numba.get_num_threads()
            numba.set_num_threads(min(self.n_threads, numba.config.NUMBA_NUM_THREADS))
            try:
                scores, documents = retrieve_utils._retrieve_internal_jitted_parallel(*args)
            finally:
                numba.set_num_threads(before)
        return documents, scores

    def score_rows(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        n_docs = len(self.docs)
        k = min(topk, n_docs)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        with self._lock:
            token_ids = self.tokenize(queries)
            live = [i for i, q in enumerate(token_ids) if q]
            if not live:
                return rows, scores
            documents, found_scores = self._retrieve([token_ids[i] for i in live], k)
        found = found_scores > 0  # a zero score means no query term occurs in that passage
        rows[live] = np.where(found, documents, -1)
        scores[live] = np.where(found, found_scores, -np.inf)
        return rows, scores


def index_corpus_bm25(corpus: str | os.PathLike | CorpusReader, out_dir: str | os.PathLike, config: BM25Config,
                      on_error: str = "raise", show_progress: bool = True) -> BM25Index:
    """CLI helper: build and save a BM25 index of a corpus file (records its fingerprint in the manifest)."""
    path = corpus.path if isinstance(corpus, CorpusReader) else corpus
    return BM25Index.build(path, out_dir, config=config, on_error=on_error, show_progress=show_progress)


def import_bm25s_index(folder: str | os.PathLike, corpus: str | os.PathLike, out_dir: str | os.PathLike, *,
                       on_error: str = "raise", show_progress: bool = False) -> BM25Index:
    """Serve a FlashRAG bm25s index folder (``index_builder --bm25_backend bm25s``: bm25s' arrays with the tokenizer's
    vocabulary and stop words saved next to them) without re-indexing.

    ``out_dir/bm25`` and ``out_dir/tokenizer`` are symbolic links to the folder (nothing copied; the score arrays are
    memory-mapped as for our own indexes); the corpus is streamed into the passage store. Refused, with one message
    naming both, when the folder's ``num_docs`` differs from the corpus' row count, or when it is not an English
    bm25s index (FlashRAG's Chinese one uses stop words this package does not ship).
    """
    folder = Path(folder).resolve()
    if (folder / "bm25" / "params.index.json").is_file():  # FlashRAG's save_dir: the index is in save_dir/bm25
        folder = folder / "bm25"
    params_path = folder / "params.index.json"
    if not params_path.is_file():
        raise ValueError(f"--import-bm25s {folder}: no params.index.json; pass the folder bm25s saved (FlashRAG: "
                         "<save_dir>/bm25)")
    params = json.loads(params_path.read_text(encoding="utf-8"))
    for name in ("vocab.tokenizer.json", "stopwords.tokenizer.json"):
        if not (folder / name).is_file():
            raise ValueError(f"--import-bm25s {folder}: no {name} (the tokenizer's files, which FlashRAG saves next "
                             "to the index); without them queries cannot be tokenized as the index was")
    stopwords = json.loads((folder / "stopwords.tokenizer.json").read_text(encoding="utf-8"))
    english = set(make_tokenizer(BM25Config()).stopwords)
    if set(stopwords) != english:
        raise ValueError(f"--import-bm25s {folder}: its stop words are not bm25s' English list (a Chinese index?); "
                         "only English bm25s indexes (English stemmer and stop words) can be imported")
    config = BM25Config(k1=float(params.get("k1", 1.5)), b=float(params.get("b", 0.75)),
                        method=str(params.get("method", "lucene")), stemmer="english", stopwords="en")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    reader = read_corpus(corpus, on_error=on_error)
    n = store_documents(reader, directory / "docs", show_progress=show_progress)
    if n != params.get("num_docs"):
        raise ValueError(f"--import-bm25s {folder} indexes {params.get('num_docs')} documents but --corpus {corpus} "
                         f"has {n} rows; row i must be document i: pass the corpus it was built from")
    for name in ("bm25", "tokenizer"):
        link = directory / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(folder, target_is_directory=True)
    manifest = Manifest(method="bm25", count=n, params={**dataclasses.asdict(config),
                                                                  "imported_from": str(folder)})
    manifest.set_corpus(reader.path)
    manifest.skipped = reader.skipped
    manifest.save(directory)
    return BM25Index.load(directory)


def drop_word_caches(tokenizer) -> None:
    """Empty a stemming tokenizer's word -> stem and word -> id maps, keeping its vocabulary (stem -> id).

    Those two maps cache the stemmer: bm25s refills them from the words it next meets and assigns the same ids
    (a word missing from them is stemmed and looked up in stem -> id). Kept for a whole corpus they hold every
    distinct word twice more than the vocabulary does (at wiki-18's ~20M types about twice its memory); emptied
    after each chunk they hold one chunk's words. The empty token's entries, which bm25s reads to give an empty
    passage its id, are kept. Without a stemmer word -> id IS the vocabulary and nothing is dropped.
    """
    if tokenizer.stemmer is None or "" not in tokenizer.stem_to_sid:
        return
    tokenizer.word_to_stem = {"": ""}
    tokenizer.word_to_id = {"": tokenizer.stem_to_sid[""]}


def write_json_object(fh, items: Iterable[tuple[str, object]], slice_size: int = 100_000) -> None:
    """Write ``dict(items)`` as one JSON object (as ``json.dumps(..., ensure_ascii=False)``) a slice at a time, so a
    vocabulary of tens of millions of terms is never held a second time as one string."""
    fh.write("{")
    items, sep = iter(items), ""
    while batch := dict(itertools.islice(items, slice_size)):
        fh.write(sep + json.dumps(batch, ensure_ascii=False)[1:-1])
        sep = ", "
    fh.write("}")


def save_tokenizer_vocab(tokenizer, directory: Path) -> None:
    """bm25s' ``Tokenizer.save_vocab`` (same file, same three maps), written a slice at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "vocab.tokenizer.json", "w", encoding="utf-8") as fh:
        for i, name in enumerate(("word_to_stem", "stem_to_sid", "word_to_id")):
            fh.write(("{" if i == 0 else ", ") + json.dumps(name) + ": ")
            write_json_object(fh, getattr(tokenizer, name).items())
        fh.write("}")


STREAMING_METHODS = ("lucene",)
"""Scoring variants the bounded-memory builder (:func:`build_scores_streaming`) computes; the others (bm25s'
``robertson``, ``atire``, ``bm25l``, ``bm25+``) are built in memory by bm25s itself."""


class _Spill:
    """Append-only binary file of one dtype, read back in the chunks it was written in."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self._fh = open(path, "wb")
        self.sizes: list[int] = []

    def write(self, arr: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.sizes.append(len(arr))

    def chunks(self) -> Iterator[np.ndarray]:
        self._fh.close()
        with open(self.path, "rb") as fh:
            for size in self.sizes:
                yield np.frombuffer(fh.read(size * self.dtype.itemsize), dtype=self.dtype)

    def remove(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


def build_scores_streaming(token_chunks: Iterable[list[list[int]]], vocab_dict, config: BM25Config,
                           out_dir: Path, tmp_dir: Path, bucket_entries: int = 8_000_000) -> int:
    """Write bm25s' score matrix files (``data``/``indices``/``indptr.csc.index.npy``, ``vocab.index.json``,
    ``params.index.json``) into ``out_dir`` with memory bounded independently of the corpus size.

    Same arrays as ``bm25s.BM25(method="lucene").index((ids, vocab))`` (tested equal), built in three passes:

    1. for each chunk of tokenized documents: its (term, term frequency) pairs, one run per document sorted by
       term, are appended to a spill file; document lengths and per-term document frequencies are accumulated;
    2. with ``df`` known, the columns are cut into buckets of about ``bucket_entries`` non-zeros (contiguous term
       ranges) and the spill is partitioned into one file per bucket (documents stay in increasing order);
    3. each bucket in turn is loaded, scored (``idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))``, float64
       then stored as float32, as bm25s does), stably sorted by term and appended to the output arrays.

    ``vocab_dict`` is the tokenizer's vocabulary, or a callable returning it once ``token_chunks`` is consumed.
    Held in memory: the tokenizer's vocabulary (it grows while ``token_chunks`` is consumed; never copied), 8 bytes
    per document, 16 bytes per term, one chunk and one bucket. Temporary disk: about 20 bytes per (document,
    distinct term) pair, in ``tmp_dir``. Returns the number of documents.
    """
    import bm25s

    tmp_dir.mkdir(parents=True, exist_ok=True)
    terms_spill = _Spill(tmp_dir / "terms.i32", np.int32)
    tf_spill = _Spill(tmp_dir / "tf.i32", np.int32)
    lengths: list[np.ndarray] = []  # tokens per document
    uniques: list[np.ndarray] = []  # distinct terms per document
    df = np.zeros(0, dtype=np.int64)
    try:
        for ids in token_chunks:  # pass 1
            n_tok = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(n_tok.sum()))
            doc = np.repeat(np.arange(len(ids), dtype=np.int64), n_tok)
            order = np.lexsort((flat, doc))
            flat, doc = flat[order], doc[order]
            starts = np.flatnonzero(np.r_[True, (flat[1:] != flat[:-1]) | (doc[1:] != doc[:-1])]) if flat.size else \
                np.zeros(0, dtype=np.int64)
            tf = np.diff(np.r_[starts, flat.size])
            terms = flat[starts]
            uniques.append(np.bincount(doc[starts], minlength=len(ids)).astype(np.int32))
            lengths.append(n_tok.astype(np.int32))
            terms_spill.write(terms)
            tf_spill.write(tf)
            if terms.size and terms.max() >= df.size:
                df = np.concatenate([df, np.zeros(int(terms.max()) + 1 - df.size, dtype=np.int64)])
            df[: terms.max() + 1 if terms.size else 0] += np.bincount(terms, minlength=0)[: df.size]
        n_docs = int(sum(len(x) for x in lengths))
        if n_docs == 0:
            raise ValueError("cannot build a BM25 index from an empty corpus")
        vocab_dict = vocab_dict() if callable(vocab_dict) else vocab_dict  # read once every chunk is tokenized
        n_vocab = len(vocab_dict)
        if df.size > n_vocab:
            raise ValueError(f"token id {df.size - 1} is outside the vocabulary of {n_vocab}")
        df = np.concatenate([df, np.zeros(n_vocab - df.size, dtype=np.int64)])
        lengths_all = np.concatenate(lengths)
        del lengths
        avg_doc_len = lengths_all.astype(np.int64).mean()  # as bm25s: np.array(lengths).mean()
        with np.errstate(divide="ignore"):
            idf = np.where(df > 0, np.log(1 + (n_docs - df + 0.5) / (df + 0.5)), 0.0).astype(np.float32)
        indptr = np.concatenate([[0], np.cumsum(df)])
        nnz = int(indptr[-1])
        # bucket k holds columns [cuts[k], cuts[k + 1]): about bucket_entries non-zeros each
        targets = np.arange(1, -(-nnz // bucket_entries)) * bucket_entries
        cuts = np.unique(np.r_[0, np.searchsorted(indptr[1:], targets, side="left") + 1, n_vocab]).astype(np.int64)
        cuts = cuts[cuts <= n_vocab]
        buckets = [(_Spill(tmp_dir / f"b{k}.terms", np.int32), _Spill(tmp_dir / f"b{k}.docs", np.int32),
                    _Spill(tmp_dir / f"b{k}.tf", np.int32)) for k in range(len(cuts) - 1)]
        doc_offset = 0
        for terms, tf, unique in zip(terms_spill.chunks(), tf_spill.chunks(), uniques):  # pass 2
            docs = np.repeat(np.arange(doc_offset, doc_offset + len(unique), dtype=np.int64), unique)
            doc_offset += len(unique)
            which = np.searchsorted(cuts, terms, side="right") - 1
            for k in np.unique(which).tolist():
                mask = which == k
                buckets[k][0].write(terms[mask])
                buckets[k][1].write(docs[mask])
                buckets[k][2].write(tf[mask])
        terms_spill.remove()
        tf_spill.remove()
        del uniques
        out_dir.mkdir(parents=True, exist_ok=True)
        k1, b = config.k1, config.b
        with open(out_dir / "data.csc.index.npy", "wb") as data_fh, \
                open(out_dir / "indices.csc.index.npy", "wb") as indices_fh:
            np.lib.format.write_array_header_1_0(data_fh, {"descr": "<f4", "fortran_order": False, "shape": (nnz,)})
            np.lib.format.write_array_header_1_0(indices_fh, {"descr": "<i4", "fortran_order": False,
                                                             "shape": (nnz,)})
            for terms_b, docs_b, tf_b in buckets:  # pass 3
                terms = np.concatenate(list(terms_b.chunks()) or [np.zeros(0, np.int32)])
                docs = np.concatenate(list(docs_b.chunks()) or [np.zeros(0, np.int32)])
                tf = np.concatenate(list(tf_b.chunks()) or [np.zeros(0, np.int32)]).astype(np.float64)
                for spill in (terms_b, docs_b, tf_b):
                    spill.remove()
                l_d = lengths_all[docs].astype(np.float64)
                scores = idf[terms].astype(np.float64) * (tf / (k1 * ((1 - b) + b * l_d / avg_doc_len) + tf))
                order = np.argsort(terms, kind="stable")
                data_fh.write(scores[order].astype(np.float32).tobytes())
                indices_fh.write(docs[order].astype(np.int32).tobytes())
        np.save(out_dir / "indptr.csc.index.npy", indptr.astype(np.int64))  # bm25s' numpy CSC builder: int64
        # as bm25s' index(create_empty_token=True): the empty token gets the next id
        empty = [] if "" in vocab_dict else [("", max(vocab_dict.values()) + 1)]
        with open(out_dir / "vocab.index.json", "w", encoding="utf-8") as fh:
            write_json_object(fh, itertools.chain(vocab_dict.items(), empty))
        params = dict(k1=k1, b=b, delta=0.5, method=config.method, idf_method=config.method, dtype="float32",
                      int_dtype="int32", num_docs=n_docs, version=bm25s.__version__, backend="numpy")
        (out_dir / "params.index.json").write_text(json.dumps(params, indent=4), encoding="utf-8")
        return n_docs
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
