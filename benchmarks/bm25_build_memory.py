"""Peak memory and time of ``openrlhf-search index --method bm25`` on a synthetic corpus shaped like wiki-18.

wiki-18 (Search-R1's corpus) is 21M passages of 100 words each (DPR's split of Wikipedia) with a title line. This
writes N passages of a 100-word body plus a 2-word title. Word frequencies follow a Zipf law (exponent 1.07, the
most frequent types being bm25s' English stop words) and the vocabulary grows by Heaps' law, ``V(n) = k * n**beta``
types after ``n`` running words: by default ``beta = 0.6`` with ``k`` chosen so that wiki-18's 2.1 billion words
give 20M types (``--wiki18-types``), i.e. 3.2M types at 1M passages and 7.4M at 4M. Pseudo-words have no vowel, so
the English stemmer keeps them apart (types after tokenization = types written, less the stop words). The index
command runs in a child process; a line every ``--sample-s`` seconds gives its resident memory, its peak so far,
its CPU time and the bytes it has read relative to the corpus size (the memory curve), and the last line its peak
resident memory (``ru_maxrss``), times, and the index's types and (passage, term) pairs.

    python benchmarks/bm25_build_memory.py --passages 1000000 --workdir /tmp/bm25mem
    nice -n 10 python benchmarks/bm25_build_memory.py --passages 4000000 --workdir /tmp/bm25mem
    # one memory term at a time, at wiki-18's scale:
    python benchmarks/bm25_build_memory.py --passages 300000 --types 20e6 --beta 1 --workdir /tmp/bm25mem  # 20M types
    python benchmarks/bm25_build_memory.py --passages 21015324 --passage-term --workdir /tmp/bm25mem  # 21M passages
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


WORD_BYTES = 15  # "q", at most 13 base-30 digits, a space


def pseudo_words(start: int, stop: int, block: int = 1 << 20) -> np.ndarray:
    """Types ``start..stop-1`` as distinct stem-invariant words of 4-14 characters (mean about 9, as a rare
    Wikipedia token), each followed by a space, as fixed-width bytes (``S15``, NUL-padded): ``q`` + the number in
    base 30 (digits and consonants), left-padded with ``0`` to a width that varies with the number (no number's own
    digits start with ``0``: all distinct). Built a block at a time (small temporaries)."""
    base, width = len(ALPHABET), WORD_BYTES - 2
    alphabet = np.frombuffer(ALPHABET.encode(), dtype=np.uint8)
    out = np.zeros((stop - start, WORD_BYTES), dtype=np.uint8)
    pos = np.arange(width, dtype=np.int8)[None, :]  # character position after "q"
    for lo in range(start, stop, block):
        ids = np.arange(lo, min(lo + block, stop), dtype=np.int64)
        digits = np.stack([(ids // base**j) % base for j in range(width)], axis=1).astype(np.uint8)  # low first
        n_digits = np.where(ids == 0, 1, width - (digits[:, ::-1] != 0).argmax(axis=1)).astype(np.int8)
        w = np.maximum(n_digits, 3 + (n_digits.astype(np.int64) * 7919 + alphabet[digits[:, 0]]) % 11).astype(np.int8)
        place = w[:, None] - 1 - pos  # digit place shown at each position (negative: past the end)
        shown = np.where(place < n_digits[:, None],
                         alphabet[np.take_along_axis(digits, place.clip(0, width - 1).astype(np.intp), 1)], ord("0"))
        rows = out[lo - start : lo - start + len(ids)]
        rows[:, 0] = ord("q")
        rows[:, 1 : width + 1] = np.where(pos < w[:, None], shown, 0)
        rows[np.arange(len(ids)), w.astype(np.intp) + 1] = ord(" ")
    return out.view(f"S{WORD_BYTES}").ravel()


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
    words = np.concatenate([np.array([w.encode() + b" " for w in STOPWORDS_EN], dtype=f"S{WORD_BYTES}"),
                            pseudo_words(0, max(0, n_types - len(STOPWORDS_EN)))])
    cum = np.cumsum(1.0 / np.arange(1, n_types + 1, dtype=np.float64) ** zipf)
    with open(path, "wb") as fh:
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
            titles = words[ids[:TITLE_WORDS * n]].reshape(n, TITLE_WORDS).tolist()
            rows[:, 0] = [b'{"id": "%d", "contents": "\\"%s\\"\\n' % (start + i, b"".join(t).strip())
                          for i, t in enumerate(titles)]
            rows[:, 1:BODY_WORDS + 1] = words[ids[TITLE_WORDS * n:]].reshape(n, BODY_WORDS).astype(object)
            rows[:, BODY_WORDS + 1] = b'"}\n'
            fh.write(b"".join(rows.ravel().tolist()))
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


def measure_passage_term(passages: int, work: Path, chunk: int = 20_000) -> dict:
    """The memory that grows with the number of passages, measured at ``passages`` in this process: the passage
    store's offset arrays (what ``DocStoreWriter`` holds) and the builder's per-passage arrays, with one one-word
    passage per row, so that neither the vocabulary nor the (passage, term) pairs grow."""
    import resource

    from openrlhf_search.retrieval.bm25 import BM25Config, build_scores_streaming
    from openrlhf_search.retrieval.docstore import DocStoreWriter
    from openrlhf_search.retrieval.types import Document

    def rss_gb() -> float:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024**2

    import bm25s  # noqa: F401  (imported before the baseline: only the per-passage memory is measured)

    base = rss_gb()
    start, cpu = time.perf_counter(), time.process_time()
    out = work / f"passage-term-{passages}"
    with DocStoreWriter(out / "docs") as writer:
        def chunks():
            one = [[0]] * chunk
            for first in range(0, passages, chunk):
                n = min(chunk, passages - first)
                for i in range(first, first + n):
                    writer.add(Document(str(i), "w"))
                yield one[:n]

        build_scores_streaming(chunks(), {"w": 0}, BM25Config(), out / "bm25", out / "bm25.tmp")
        before_close = rss_gb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"passages": passages, "baseline_rss_gb": round(base, 3), "peak_rss_gb": round(peak, 3),
            "rss_before_close_gb": round(before_close, 3),
            "bytes_per_passage": round((peak - base) * 1024**3 / passages, 1),
            "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - cpu, 1)}


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
    parser.add_argument("--write-corpus-only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--passage-term", action="store_true",
                        help="measure only the memory that grows with --passages (one-word passages, no corpus)")
    args = parser.parse_args()
    if args.passage_term:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure_passage_term(args.passages, Path(args.workdir))), flush=True)
        return 0
    if args.types is not None:
        k = args.types / (args.passages * TOKENS_PER_PASSAGE) ** args.beta
    else:
        k = args.wiki18_types / (WIKI18_PASSAGES * TOKENS_PER_PASSAGE) ** args.beta
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.passages}-b{args.beta:g}-k{k:.4g}"
    corpus = work / f"synthetic-{tag}.jsonl"
    if args.write_corpus_only:
        n_types = write_corpus(Path(args.write_corpus_only), args.passages, k, args.beta)
        print(f"{n_types:,} word types", flush=True)
        return 0
    if not corpus.exists():  # written by a child process, so that this one stays small while the index is built
        start = time.perf_counter()
        partial = corpus.with_suffix(".partial")
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--write-corpus-only", str(partial)], check=True)
        partial.rename(corpus)
        print(f"wrote {corpus} ({corpus.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s",
              flush=True)
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
