"""Peak memory and time of ``openrlhf-search index --method bm25`` on a synthetic corpus shaped like wiki-18.

wiki-18 (Search-R1's corpus) is 21M passages of 100 words each (DPR's split of Wikipedia) with a title line. This
writes N passages of a 100-word body (plus a 2-word title) drawn from a Zipf distribution over a vocabulary of
``--vocab`` pseudo-words (Wikipedia-like: a few very frequent words, a long tail of rare ones), then runs the index
command in a child process and reports its peak resident memory (``ru_maxrss`` of the child) and wall time.

    python benchmarks/bm25_build_memory.py --passages 1000000 --workdir /tmp/bm25mem
    nice -n 19 python benchmarks/bm25_build_memory.py --passages 4000000 --workdir /tmp/bm25mem
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_corpus(path: Path, passages: int, vocab: int, seed: int = 0, chunk: int = 20_000) -> None:
    rng = np.random.default_rng(seed)
    words = np.array([f"q{i:x} " for i in range(vocab)], dtype=object)  # distinct pseudo-words (+ a space)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = 1.0 / ranks**1.07  # Zipf exponent close to English text
    cdf = np.cumsum(p / p.sum())
    with open(path, "w", encoding="utf-8") as fh:
        for start in range(0, passages, chunk):
            n = min(chunk, passages - start)
            # one row per line: '{"id": "i", "contents": "\\"t1 t2\\"\\n', 100 body words, '"}\n'; joined in one call
            rows = np.empty((n, 102), dtype=object)
            titles = words[np.searchsorted(cdf, rng.random((n, 2)), side="right").clip(0, vocab - 1)]
            rows[:, 0] = [f'{{"id": "{start + i}", "contents": "\\"{a}{b.strip()}\\"\\n' for i, (a, b) in
                          enumerate(titles)]
            rows[:, 1:101] = words[np.searchsorted(cdf, rng.random((n, 100)), side="right").clip(0, vocab - 1)]
            rows[:, 101] = '"}\n'
            fh.write("".join(rows.ravel().tolist()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, required=True)
    parser.add_argument("--vocab", type=int, default=2_000_000, help="pseudo-word types (default 2M)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--extra", default="", help="extra flags for `index` (e.g. '--bm25-method robertson')")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"synthetic-{args.passages}.jsonl"
    if not corpus.exists():
        start = time.perf_counter()
        write_corpus(corpus, args.passages, args.vocab)
        print(f"wrote {corpus} ({corpus.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s",
              flush=True)
    out = work / f"index-{args.passages}"
    cmd = [sys.executable, "-m", "openrlhf_search", "index", "--corpus", str(corpus), "--out", str(out),
           "--method", "bm25", "--force", "--quiet", *args.extra.split()]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    result = {"passages": args.passages, "vocab": args.vocab, "exit": os.waitstatus_to_exitcode(status),
              "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 3),
              "user_s": round(usage.ru_utime, 1), "extra": args.extra}
    print(json.dumps(result), flush=True)
    return 0 if result["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
