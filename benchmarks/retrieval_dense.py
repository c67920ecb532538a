"""Dense retrieval costs (MiniLM-L6, 384-d, FAISS on CPU): encoding vs search, index size and build time per 100k.

    nice -n 10 python benchmarks/retrieval_dense.py                       # flat; encode 2,000 passages
    nice -n 10 python benchmarks/retrieval_dense.py --types flat hnsw ivfpq --encode-passages 5000

Encoding 100k passages with MiniLM on 2 CPU cores takes ~40 min (~40 passages/s), so passage encoding is timed
on ``--encode-passages`` passages of the synthetic corpus and EXTRAPOLATED linearly to 100k (stated in the
output). FAISS cost does not depend on what the vectors mean, so the index build/search figures use 100k random
unit vectors of the same dimension (the real encoder's output on the sample has the same shape and norm).
Query encoding is timed on real queries at batch 256; queries/s at batch 256, top-3, is reported split into
encoding and search.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_common import DEFAULT_WORKDIR, batches, machine, sample_queries, synthetic_corpus  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=100_000, help="index size for the FAISS figures")
    parser.add_argument("--encode-passages", type=int, default=2000, help="passages actually encoded")
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--types", nargs="+", default=["flat"], choices=["flat", "hnsw", "ivfpq"])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import faiss

    from openrlhf_search.retrieval.corpus import read_corpus
    from openrlhf_search.retrieval.dense import DenseConfig, Encoder, build_faiss_index

    corpus = synthetic_corpus(args.workdir / f"corpus_{args.passages}.jsonl", args.passages)
    result: dict = {"machine": machine(), "batch_size": args.batch_size, "topk": args.topk,
                    "faiss_threads": faiss.omp_get_max_threads()}
    start = time.perf_counter()
    encoder = Encoder(DenseConfig(batch_size=args.batch_size))
    result["encoder_load_s"] = round(time.perf_counter() - start, 2)
    dim = encoder.dim

    passages = []
    for doc in read_corpus(corpus):
        passages.append(doc.contents)
        if len(passages) == args.encode_passages:
            break
    tokens = encoder.model.tokenizer(passages[:200], truncation=True, max_length=encoder.config.max_length)
    start = time.perf_counter()
    emb = encoder.encode_passages(passages, show_progress=True)
    enc_s = time.perf_counter() - start
    per_s = len(passages) / enc_s
    result["passage_encoding"] = {
        "passages_encoded": len(passages), "seconds": round(enc_s, 1), "passages_per_s": round(per_s, 1),
        "mean_tokens_per_passage": round(float(np.mean([len(t) for t in tokens["input_ids"]])), 1),
        "extrapolated_s_per_100k": round(100_000 / per_s, 0),
    }
    assert emb.shape == (len(passages), dim)

    queries = sample_queries(corpus, args.queries)
    qb = batches(queries, args.batch_size)
    encoder.encode_queries(qb[0])  # warm-up
    start = time.perf_counter()
    qemb = [encoder.encode_queries(b) for b in qb]
    q_enc_s = time.perf_counter() - start

    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.passages, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    result["index"] = {}
    for index_type in args.types:
        cfg = DenseConfig(index_type=index_type)
        start = time.perf_counter()
        index = build_faiss_index(base, cfg)
        build_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "faiss.index"
            faiss.write_index(index, str(path))
            size = path.stat().st_size
        index.search(qemb[0], args.topk)  # warm-up
        start = time.perf_counter()
        for q in qemb:
            index.search(q, args.topk)
        search_s = time.perf_counter() - start
        n = len(queries)
        result["index"][index_type] = {
            "vectors": args.passages,
            "faiss_build_s": round(build_s, 2),
            "build_s_per_100k_including_encoding": round((build_s + 100_000 / per_s) * 100_000 / args.passages, 0),
            "index_bytes": size,
            "index_mb_per_100k": round(size / 1e6 * 100_000 / args.passages, 1),
            "batch_qps": {
                "end_to_end": round(n / (q_enc_s + search_s), 1),
                "encode_only": round(n / q_enc_s, 1),
                "search_only": round(n / search_s, 1),
            },
            "share_of_time": {"encode": round(q_enc_s / (q_enc_s + search_s), 3),
                              "search": round(search_s / (q_enc_s + search_s), 3)},
        }
    result["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    out = args.out or args.workdir / "dense_results.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
