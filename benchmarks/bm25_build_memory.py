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

ALPHABET = "0123456789bcdfghjklmnpqrstvwxz"  # digits and consonants: no vowel, so the English stemmer keeps words
TITLE_WORDS, BODY_WORDS = 2, 100  # wiki-18 (DPR's split of Wikipedia): 100-word passages with their article's title
TOKENS_PER_PASSAGE = TITLE_WORDS + BODY_WORDS
WIKI18_PASSAGES = 21_015_324


def pseudo_word(i: int) -> str:
    """Type ``i`` as a distinct stem-invariant word of 4-14 characters (mean 9, as a rare Wikipedia token)."""
    digits = []
    while True:
        i, r = divmod(i, len(ALPHABET))
        digits.append(ALPHABET[r])
        if i == 0:
            break
    body = "".join(reversed(digits))
    return "q" + body.rjust(3 + (len(digits) * 7919 + ord(body[-1])) % 11, "0")  # no body starts with 0: distinct


def heaps(tokens, k: float, beta: float):
    """Vocabulary after ``tokens`` running words: Heaps' law ``k * tokens**beta``."""
    return k * np.asarray(tokens, dtype=np.float64) ** beta


def write_corpus(path: Path, passages: int, k: float, beta: float, zipf: float = 1.07, seed: int = 0,
                 chunk: int = 20_000) -> int:
    """Write ``passages`` rows; returns the number of word types written (before stop-word removal).

    Type ``i`` is the ``i``-th most frequent word: the first types are bm25s' English stop words, the others
    pseudo-words. The vocabulary grows by Heaps' law: after ``n`` running words exactly ``V(n) = k * n**beta``
    types have occurred, each new one planted once at a random place in the chunk that reaches it; every other word
    is drawn from a Zipf law (``p(i) ~ 1 / (i + 1)**zipf``) over the types that have occurred by the chunk's end.
    """
    from bm25s.stopwords import STOPWORDS_EN

    rng = np.random.default_rng(seed)
    n_types = int(heaps(passages * TOKENS_PER_PASSAGE, k, beta))
    words = np.array([w + " " for w in STOPWORDS_EN] + [pseudo_word(i) + " "
                                                         for i in range(max(0, n_types - len(STOPWORDS_EN)))],
                     dtype=object)
    cum = np.cumsum(1.0 / np.arange(1, n_types + 1, dtype=np.float64) ** zipf)
    with open(path, "w", encoding="utf-8") as fh:
        for start in range(0, passages, chunk):
            n = min(chunk, passages - start)
            tokens = n * TOKENS_PER_PASSAGE
            v0, v1 = (min(n_types, int(v)) for v in heaps(np.array([start, start + n]) * TOKENS_PER_PASSAGE, k,
                                                          beta))
            v1 = max(v1, 1)
            ids = np.searchsorted(cum[:v1], rng.random(tokens) * cum[v1 - 1], side="right").clip(0, v1 - 1)
            if v1 > v0:  # every type that Heaps' law says first occurs in this chunk occurs in it
                ids[rng.choice(tokens, size=v1 - v0, replace=False)] = rng.permutation(np.arange(v0, v1))
            # one row per line: '{"id": "i", "contents": "\\"t1 t2\\"\\n', 100 body words, '"}\n'; joined in one call
            rows = np.empty((n, BODY_WORDS + 2), dtype=object)
            titles = words[ids[:TITLE_WORDS * n].reshape(n, TITLE_WORDS)]
            rows[:, 0] = [f'{{"id": "{start + i}", "contents": "\\"{"".join(t).strip()}\\"\\n' for i, t in
                          enumerate(titles)]
            rows[:, 1:BODY_WORDS + 1] = words[ids[TITLE_WORDS * n:].reshape(n, BODY_WORDS)]
            rows[:, BODY_WORDS + 1] = '"}\n'
            fh.write("".join(rows.ravel().tolist()))
    return n_types


def sample_child(pid: int, corpus_bytes: int) -> str:
    """One line of the memory curve: the child's resident memory, its peak so far, CPU time, corpus share read."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.split()[0] if value.split() else ""
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rchar = int(Path(f"/proc/{pid}/io").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return ""
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return (f"rss_gb={int(fields.get('VmRSS', 0)) / 1024**2:.2f} peak_gb={int(fields.get('VmHWM', 0)) / 1024**2:.2f} "
            f"cpu_s={cpu:.0f} read={min(rchar / corpus_bytes, 9.99):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, required=True)
    parser.add_argument("--beta", type=float, default=0.6, help="Heaps' law exponent of the vocabulary growth")
    parser.add_argument("--wiki18-types", type=float, default=20e6,
                        help="types at wiki-18's size (21M passages) that fix Heaps' constant (default 20M)")
    parser.add_argument("--types", type=float, default=None,
                        help="instead: the types at THIS corpus' end (vocabulary stress runs, e.g. --beta 1)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between memory-curve lines")
    parser.add_argument("--extra", default="", help="extra flags for `index` (e.g. '--bm25-method robertson')")
    args = parser.parse_args()
    if args.types is not None:
        k = args.types / (args.passages * TOKENS_PER_PASSAGE) ** args.beta
    else:
        k = args.wiki18_types / (WIKI18_PASSAGES * TOKENS_PER_PASSAGE) ** args.beta
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.passages}-b{args.beta:g}-k{k:.4g}"
    corpus = work / f"synthetic-{tag}.jsonl"
    if not corpus.exists():
        start = time.perf_counter()
        n_types = write_corpus(corpus.with_suffix(".partial"), args.passages, k, args.beta)
        corpus.with_suffix(".partial").rename(corpus)
        print(f"wrote {corpus} ({corpus.stat().st_size / 1e9:.2f} GB, {n_types:,} word types) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    out = work / f"index-{tag}"
    cmd = [sys.executable, "-m", "openrlhf_search", "index", "--corpus", str(corpus), "--out", str(out),
           "--method", "bm25", "--force", "--quiet", *args.extra.split()]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    size = corpus.stat().st_size
    while True:  # the memory curve: a line every --sample-s seconds while the child runs
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        line = sample_child(proc.pid, size)
        if line:
            print(f"t={time.perf_counter() - start:.0f}s {line} load={os.getloadavg()[0]:.1f}", flush=True)
        time.sleep(args.sample_s)
    wall = time.perf_counter() - start
    result = {"passages": args.passages, "beta": args.beta, "heaps_k": k, "exit": os.waitstatus_to_exitcode(status),
              "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 3),
              "user_s": round(usage.ru_utime, 1), "load_1min_end": round(os.getloadavg()[0], 1), "extra": args.extra}
    if result["exit"] == 0:  # the index's own sizes, read from array headers (nothing loaded)
        indptr = np.load(out / "bm25" / "indptr.csc.index.npy", mmap_mode="r")
        result["index_types"] = int(indptr.shape[0] - 1)
        result["pairs"] = int(indptr[-1])
    print(json.dumps(result), flush=True)
    return 0 if result["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
