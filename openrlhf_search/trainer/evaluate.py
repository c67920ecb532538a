"""Held-out evaluation: rollouts over FlashRAG-format datasets, EM / subEM / F1 per dataset and on average.

Used by ``openrlhf-search eval`` and by the trainer (held-out score before and after RL). Rollouts go through the
same engine, environment and runner as training (greedy by default), so an evaluated policy behaves exactly as it
did in training.

Dataset names of the Search-R1 protocol are resolved in ``--data-dir`` (FlashRAG layout):
``<dir>/<name>/test.jsonl``, else ``<name>/dev.jsonl``, ``<name>/train.jsonl``, ``<dir>/<name>.jsonl`` or
``<dir>/<name>.parquet``. Anything else is treated as a file path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SEARCH_R1_DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
"""The seven test sets of the Search-R1 protocol (FlashRAG names)."""


def resolve_dataset(name_or_path: str, data_dir: str | Path | None) -> Path:
    """Map a Search-R1 dataset name to a file in ``data_dir``, or return the path itself.

    Raises:
        FileNotFoundError: naming every location that was tried.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    tried = [str(p)]
    if data_dir is not None:
        d = Path(data_dir)
        cands = [d / name_or_path / f"{split}.jsonl" for split in ("test", "dev", "train")]
        cands += [d / f"{name_or_path}.jsonl", d / f"{name_or_path}.parquet", d / name_or_path / "test.parquet"]
        for c in cands:
            if c.is_file():
                return c
        tried += [str(c) for c in cands]
    hint = ""
    if name_or_path in SEARCH_R1_DATASETS and data_dir is None:
        hint = f" ({name_or_path!r} is a Search-R1 dataset name: pass --data-dir with the FlashRAG files)"
    raise FileNotFoundError(f"dataset {name_or_path!r} not found{hint}; tried: {', '.join(tried)}")


@dataclass
class EvalRow:
    """Scores of one dataset."""

    dataset: str
    n: int
    em: float
    subem: float
    f1: float
    turns: float
    searches: float
    answered: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def score_rollouts(trajs, tokenizer=None) -> dict[str, float]:
    """Mean EM, subEM, F1 of the final answers, turns, searches and answered share over trajectories."""
    from openrlhf_search.rewards import exact_match, f1_score, substring_exact_match

    n = len(trajs)
    if n == 0:
        return {"n": 0, "em": 0.0, "subem": 0.0, "f1": 0.0, "turns": 0.0, "searches": 0.0, "answered": 0.0}
    tot = {"em": 0.0, "subem": 0.0, "f1": 0.0, "turns": 0.0, "searches": 0.0, "answered": 0.0}
    for t in trajs:
        golds = t.meta["golden_answers"]
        tot["em"] += exact_match(t.answer, golds)
        tot["subem"] += substring_exact_match(t.answer, golds)
        tot["f1"] += f1_score(t.answer, golds)
        tot["turns"] += len(t.turns)
        tot["searches"] += t.num_searches
        tot["answered"] += t.answer is not None
    return {"n": n, **{k: v / n for k, v in tot.items()}}


def evaluate_datasets(engine, env, datasets: dict[str, list], params, batch_size: int = 64,
                      progress: bool = False) -> tuple[list[EvalRow], list]:
    """Roll out every question once per dataset; returns one :class:`EvalRow` per dataset + the trajectories."""
    from openrlhf_search.rollout.runner import run_rollouts

    rows, all_trajs = [], []
    for name, samples in datasets.items():
        trajs = []
        for i in range(0, len(samples), batch_size):
            trajs += run_rollouts(engine, env, samples[i : i + batch_size], 1, params)
            if progress:
                print(f"  {name}: {len(trajs)}/{len(samples)}", flush=True)
        s = score_rollouts(trajs)
        rows.append(EvalRow(name, s["n"], s["em"], s["subem"], s["f1"], s["turns"], s["searches"], s["answered"]))
        all_trajs += trajs
    return rows, all_trajs


def average_row(rows: list[EvalRow]) -> EvalRow:
    """Unweighted mean over datasets (the Search-R1 papers' "Avg." column)."""
    k = max(1, len(rows))
    return EvalRow("average", sum(r.n for r in rows), *(sum(getattr(r, f) for r in rows) / k
                                                         for f in ("em", "subem", "f1", "turns", "searches",
                                                                   "answered")))


def markdown_table(rows: list[EvalRow]) -> str:
    """The results table in Markdown (scores in %)."""
    lines = ["| dataset | n | EM | subEM | F1 | turns | searches |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows + ([average_row(rows)] if len(rows) > 1 else []):
        lines.append(f"| {r.dataset} | {r.n} | {100 * r.em:.1f} | {100 * r.subem:.1f} | {100 * r.f1:.1f} | "
                     f"{r.turns:.2f} | {r.searches:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[EvalRow], out_dir: str | Path, trajs=None) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` (and ``rollouts.jsonl`` when trajectories are given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json"}
    paths["markdown"].write_text(markdown_table(rows), encoding="utf-8")
    payload = {"datasets": [r.as_dict() for r in rows], "average": average_row(rows).as_dict()}
    paths["json"].write_text(json.dumps(payload, indent=1), encoding="utf-8")
    if trajs is not None:
        paths["rollouts"] = out / "rollouts.jsonl"
        with open(paths["rollouts"], "w", encoding="utf-8") as fh:
            for t in trajs:
                fh.write(json.dumps(t.to_dict(), default=str) + "\n")
    return paths
