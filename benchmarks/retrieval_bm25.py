"""BM25 throughput on a synthetic 100k-passage corpus: our retriever vs raw bm25s vs rank_bm25, in one run.

    nice -n 10 python benchmarks/retrieval_bm25.py            # 100k passages, batch 256, top-3
    nice -n 10 python benchmarks/retrieval_bm25.py --passages 20000 --rank-bm25-queries 16   # quick

* ours: ``BM25Retriever.search(batch, topk=3)`` on the saved, memory-mapped index -- the full API, i.e. query
  tokenization, scoring, top-k and building the ``Hit``/``Document`` objects from the on-disk store;
* raw bm25s: the same saved index loaded with ``bm25s.BM25.load``; every configuration we could think of (numba
  backend memory-mapped or in RAM, numpy backend, 1 and all threads, queries tokenized by ``bm25s.tokenize`` or by
  the saved ``Tokenizer``) is timed and the best one is the reference; it returns row ids and scores only;
* rank_bm25: ``BM25Okapi`` over the same token lists (stemmed, stop words removed), one ``get_scores`` + top-3
  per query (its API has no batch mode). It is ~1000x slower, so it runs on a subsample of queries and its
  queries/s is that subsample's rate (stated in the output).

All systems answer the same queries, interleaved batch by batch (rotating order) so that load bursts from other
processes fall on all of them alike; each figure is queries / total time over all rounds.
Results are printed as JSON and written to ``--out`` (default ``<workdir>/bm25_results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_common import DEFAULT_WORKDIR, batches, machine, sample_queries, synthetic_corpus  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2048, help="queries for ours / raw bm25s")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank-bm25-queries", type=int, default=48, help="subsample timed with rank_bm25 (0: skip)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import bm25s

    from openrlhf_search.retrieval.bm25 import BM25Index, BM25Retriever, make_tokenizer

    corpus = synthetic_corpus(args.workdir / f"corpus_{args.passages}.jsonl", args.passages)
    index_dir = args.workdir / f"bm25_{args.passages}"
    result: dict = {"machine": machine(), "passages": args.passages, "batch_size": args.batch_size,
                    "topk": args.topk, "queries": args.queries}
    if not (index_dir / "manifest.json").exists():
        start = time.perf_counter()
        BM25Index.build(corpus, index_dir, show_progress=True)
        result["build_s"] = round(time.perf_counter() - start, 2)
    queries = sample_queries(corpus, args.queries)
    qbatches = batches(queries, args.batch_size)
    k = args.topk

    index = BM25Index.load(index_dir, mmap=True)
    systems: dict[str, callable] = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        retriever = BM25Retriever(index, n_threads=threads)
        systems[f"ours (n_threads={threads})"] = lambda b, r=retriever: r.search(b, k)

    config = index.config
    import Stemmer

    stemmer = Stemmer.Stemmer(config.stemmer) if config.stemmer else None  # the same analysis as the index
    raw_tok = make_tokenizer(config)
    raw_tok.load_vocab(str(index_dir / "tokenizer"))
    raw_variants = [("numba", True, t) for t in sorted({1, os.cpu_count() or 1})]
    raw_variants += [("numba", False, t) for t in sorted({1, os.cpu_count() or 1})]
    raw_variants += [("numpy", False, 1)]
    for backend, mmap, threads in raw_variants:
        model = bm25s.BM25.load(str(index_dir / "bm25"), mmap=mmap, backend=backend, show_progress=False)
        load = "mmap" if mmap else "in RAM"

        def via_tokenize(b, m=model, t=threads):
            tokens = bm25s.tokenize(b, stopwords=config.stopwords, stemmer=stemmer, show_progress=False)
            return m.retrieve(tokens, k=k, n_threads=t, show_progress=False)

        def via_tokenizer(b, m=model, t=threads):
            ids = raw_tok.tokenize(b, update_vocab=False, return_as="ids", show_progress=False)
            return m.retrieve(ids, k=k, n_threads=t, show_progress=False)

        systems[f"raw bm25s {backend} {load} n_threads={threads} bm25s.tokenize"] = via_tokenize
        if backend == "numba":  # the numpy backend is ~15x slower: one variant is enough
            systems[f"raw bm25s {backend} {load} n_threads={threads} Tokenizer ids"] = via_tokenizer

    for fn in systems.values():  # warm-up (numba JIT / cache load, page cache)
        fn(qbatches[0])
    # Fine-grained interleaving: every batch is answered by every system in turn (in a rotating order), so load
    # bursts from other processes on this shared machine fall on all systems alike; qps = queries / total time.
    seconds = dict.fromkeys(systems, 0.0)
    per_round: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    for r in range(args.rounds):
        round_s = dict.fromkeys(systems, 0.0)
        for i, b in enumerate(qbatches):
            shift = (r * len(qbatches) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                systems[name](b)
                round_s[name] += time.perf_counter() - start
        for name in names:
            seconds[name] += round_s[name]
            per_round[name].append(round(len(queries) / round_s[name], 1))
    qps = {name: args.rounds * len(queries) / seconds[name] for name in names}
    result["qps"] = {name: round(v, 1) for name, v in qps.items()}
    result["qps_per_round"] = per_round
    ours_name = max((n for n in qps if n.startswith("ours")), key=qps.get)
    raw_name = max((n for n in qps if n.startswith("raw")), key=qps.get)
    result["ours_best"] = {"config": ours_name, "qps": round(qps[ours_name], 1)}
    result["raw_bm25s_best"] = {"config": raw_name, "qps": round(qps[raw_name], 1)}
    result["ours_vs_raw_bm25s"] = round(qps[ours_name] / qps[raw_name], 3)

    if args.rank_bm25_queries:
        from rank_bm25 import BM25Okapi

        from openrlhf_search.retrieval.corpus import read_corpus

        analyzer = make_tokenizer(config)
        start = time.perf_counter()
        corpus_tokens = []
        for chunk in batches([d.contents for d in read_corpus(corpus)], 20_000):
            corpus_tokens += analyzer.tokenize(chunk, update_vocab=True, return_as="string", show_progress=False)
        okapi = BM25Okapi(corpus_tokens, k1=config.k1, b=config.b)
        result["rank_bm25_build_s"] = round(time.perf_counter() - start, 2)
        sub = queries[: args.rank_bm25_queries]
        sub_tokens = analyzer.tokenize(sub, update_vocab=False, return_as="string", show_progress=False)
        start = time.perf_counter()
        for q in sub_tokens:
            scores = okapi.get_scores(q)
            np.argpartition(-scores, k)[:k]
        elapsed = time.perf_counter() - start
        result["rank_bm25"] = {"queries_timed": len(sub), "seconds": round(elapsed, 2),
                               "qps": round(len(sub) / elapsed, 2)}
        result["ours_vs_rank_bm25"] = round(qps[ours_name] / (len(sub) / elapsed), 1)

    result["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    out = args.out or args.workdir / f"bm25_results_{args.passages}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
