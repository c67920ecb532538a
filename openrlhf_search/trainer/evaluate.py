"""Held-out evaluation: rollouts over FlashRAG-format datasets, EM / subEM / F1 per dataset and on average.

Used by ``openrlhf-search eval`` and by the trainer (held-out score before and after RL). Rollouts go through the
same engine, environment and runner as training (greedy by default), so an evaluated policy behaves exactly as it
did in training.

Given a checkpoint of the local trainer, ``eval`` rebuilds the environment the run trained in from the run's
saved config (:func:`eval_settings`: template, budgets, passages per query, held-out sampling), loads the run's own
tokenizer (:func:`~openrlhf_search.trainer.models.load_tokenizer`) and checks the retriever before the first
question, so it reproduces the trainer's own held-out figures on the same weights.

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


EVAL_SETTINGS = {
    # setting: (section, key in the run's config.yaml, default without a run config)
    "template": ("env", "template", "search_r1"),
    "max_turns": ("env", "max_turns", 4),
    "max_tokens_per_turn": ("env", "max_tokens_per_turn", 500),
    "max_obs_tokens": ("env", "max_obs_tokens", 500),
    "max_response_tokens": ("env", "max_response_tokens", None),
    "topk": ("retriever", "topk", 3),
    "temperature": ("rollout", "eval_temperature", 0.0),
    "top_p": ("rollout", "top_p", 1.0),
    "seed": (None, "seed", 0),
}
"""What ``openrlhf-search eval`` takes from the run's saved config: the environment the policy was trained in
(template, turn/observation/response budgets, passages per query) and the trainer's held-out sampling."""

RUN_CONFIG_NAMES = ("run_config.yaml", "../../config.yaml")
"""Where a checkpoint's run config is looked up, relative to the checkpoint directory: the copy inside the
checkpoint (written by the trainer), then the run directory's ``config.yaml`` (``<run>/checkpoints/step_N``)."""


def find_run_config(model_dir: str | Path) -> Path | None:
    """The saved config of the run that wrote the checkpoint ``model_dir``, or ``None`` (not a trainer
    checkpoint: a hub model, ``smollm2``)."""
    d = Path(model_dir)
    if not d.is_dir():
        return None
    for name in RUN_CONFIG_NAMES:
        cand = (d / name).resolve()
        if cand.is_file():
            return cand
    return None


def eval_settings(run_config: str | Path | None, explicit: dict | None = None) -> tuple[dict, dict]:
    """``(settings, origin)``: each of :data:`EVAL_SETTINGS` from ``explicit`` (flags that were given, not
    ``None``), else the run config, else the default; ``origin`` says where each came from."""
    import yaml

    tree = {}
    if run_config is not None:
        tree = yaml.safe_load(Path(run_config).read_text(encoding="utf-8")) or {}
    explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
    settings, origin = {}, {}
    for name, (section, key, default) in EVAL_SETTINGS.items():
        node = tree.get(section, {}) if section else tree
        if name in explicit:
            settings[name], origin[name] = explicit[name], "flag"
        elif isinstance(node, dict) and key in node:
            settings[name], origin[name] = node[key], "run config"
        else:
            settings[name], origin[name] = default, "default"
    return settings, origin


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
    from openrlhf_search.trainer.logging import Progress

    rows, all_trajs = [], []
    for name, samples in datasets.items():
        trajs = []
        bar = Progress(len(samples), enabled=progress, desc=f"eval {name}", unit="question")
        for i in range(0, len(samples), batch_size):
            batch = run_rollouts(engine, env, samples[i : i + batch_size], 1, params)
            trajs += batch
            bar.update(len(batch), f1=score_rollouts(trajs)["f1"])
        bar.close()
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
