"""Held-out evaluation: rollouts over FlashRAG-format datasets, EM / subEM / F1 per dataset and on average.

Used by ``openrlhf-search eval`` and by the trainer (held-out score before and after RL). Rollouts go through the
same engine, environment and runner as training (greedy by default), so an evaluated policy behaves exactly as it
did in training.

Given a run of the local trainer (its directory, ``<run>/checkpoints/latest`` or one of its checkpoint directories:
:func:`resolve_model`), ``eval`` rebuilds the environment the run trained in from the run's saved config
(:func:`eval_settings`: template, budgets, passages per query, held-out sampling), loads the run's own tokenizer
(:func:`~openrlhf_search.trainer.models.load_tokenizer`) and checks the retriever before the first question; without
``--data`` it also rebuilds the run's held-out questions (:func:`run_held_out_set`) and retriever, so it reproduces
the trainer's own final held-out figures on the same weights, in the same units (fractions).

Dataset names of the Search-R1 protocol are resolved in ``--data-dir`` (FlashRAG layout):
``<dir>/<name>/test.jsonl``, else ``<name>/dev.jsonl``, ``<name>/train.jsonl``, ``<dir>/<name>.jsonl`` or
``<dir>/<name>.parquet``. Anything else is treated as a file path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from openrlhf_search.data.formats import DatasetFormatError, read_dataset
from openrlhf_search.env.scoring import reward_inputs
from openrlhf_search.rewards import exact_match, f1_score, substring_exact_match
from openrlhf_search.rollout.runner import run_rollouts
from openrlhf_search.trainer.checkpoint import LATEST, latest_checkpoint
from openrlhf_search.trainer.data import read_question_files
from openrlhf_search.trainer.logging import Progress

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
    "topk": ("env", "topk", 3),
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


@dataclass
class EvalTarget:
    """What ``--model`` names: the model to load and, for a trainer checkpoint, the run that wrote it."""

    model: str
    """A checkpoint directory (or ``smollm2``): what :func:`~openrlhf_search.trainer.models.load_pretrained` takes."""
    run_dir: Path | None = None
    """The training run's directory (``<run>/config.yaml``, ``data/``, ``index/``), when the model is one of its
    checkpoints."""


def resolve_model(spec: str) -> EvalTarget:
    """Resolve ``--model``: a run directory (its newest checkpoint), ``<run>/checkpoints/latest`` (the one-line file
    naming the newest checkpoint), a checkpoint directory, or ``smollm2``.

    Raises:
        ValueError: one line naming ``spec`` and what it is not.
    """
    p = Path(spec)
    if spec == "smollm2" and not p.exists():
        return EvalTarget("smollm2")
    if p.is_file():  # checkpoints/latest: a pointer to the newest checkpoint directory
        name = p.read_text(encoding="utf-8", errors="replace").strip()
        if p.name != LATEST and not (p.parent / name / "config.json").is_file():
            raise ValueError(f"--model {spec!r} is a file, not a model: give a run directory, <run>/checkpoints/"
                             f"{LATEST}, a checkpoint directory or 'smollm2'")
        if not name or "\n" in name or not (p.parent / name / "config.json").is_file():
            raise ValueError(f"--model {spec!r} names {name[:80]!r}, which is not a checkpoint directory under "
                             f"{p.parent}")
        p = p.parent / name
    if p.is_dir() and not (p / "config.json").is_file() and ((p / "checkpoints").is_dir() or
                                                            (p / "config.yaml").is_file()):
        ckpt = latest_checkpoint(p / "checkpoints")
        if ckpt is None:
            raise ValueError(f"--model {spec!r}: the run has no complete checkpoint under {p / 'checkpoints'} yet")
        return EvalTarget(str(ckpt), p)
    if p.is_dir() and (p / "config.json").is_file():
        run = p.parent.parent
        in_run = p.parent.name == "checkpoints" and (run / "config.yaml").is_file()
        return EvalTarget(str(p), run if in_run else None)
    if p.is_dir():
        raise ValueError(f"--model {spec!r} is neither a run directory (no checkpoints/) nor a checkpoint "
                         "(no config.json)")
    raise ValueError(f"--model {spec!r}: no such directory (expected a run directory, <run>/checkpoints/{LATEST}, a "
                     "checkpoint directory or 'smollm2')")


def run_held_out_set(cfg, run_dir: Path) -> list:
    """The held-out questions the trainer of ``run_dir`` evaluated (its ``eval_before`` / ``eval_after``), in the
    same order: the first ``data.num_eval`` of the synthetic KB's test split the run wrote (``<run>/data``), or of
    ``data.eval_files`` read as the trainer reads them (question-length cap included).

    Raises:
        ValueError: the run has no held-out set, or its files are gone (one line naming them).
    """
    if cfg.data.source == "synthetic":
        path = Path(run_dir) / "data" / "test.jsonl"
        if not path.is_file():
            raise ValueError(f"the run's held-out questions {path} are missing (pass --data)")
        return read_dataset(path)[: cfg.data.num_eval]
    if not cfg.data.eval_files:
        raise ValueError(f"the run {run_dir} has no held-out set (data.eval_files is empty): pass --data")
    try:
        return read_question_files(cfg.data.eval_files, cfg, "data.eval_files")[: cfg.data.num_eval]
    except DatasetFormatError as exc:
        raise ValueError(f"the run's held-out set: {exc}") from None


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
    valid_format: float = 0.0
    """Share of responses that follow the protocol (:func:`~openrlhf_search.rewards.is_valid_format`)."""
    retrieval_hit: float = 0.0
    """Share of questions whose retrieved passages contain a golden answer (the reward's ``retrieval_hit``)."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


SCORES = ("em", "subem", "f1", "turns", "searches", "answered", "valid_format", "retrieval_hit")
"""The per-question means of :func:`score_rollouts` (besides ``n``), all fractions except turns and searches."""


def score_rollouts(trajs) -> dict[str, float]:
    """Means over trajectories: EM, subEM, F1 of the accepted answer, turns, searches, the answered share, the share
    of well-formed responses (``valid_format``) and of questions whose retrieved text holds a golden answer
    (``retrieval_hit``), both as the reward sees them (:func:`~openrlhf_search.env.scoring.reward_inputs`)."""
    n = len(trajs)
    tot = dict.fromkeys(SCORES, 0.0)
    if n == 0:
        return {"n": 0, **tot}
    for t in trajs:
        golds = t.meta["golden_answers"]
        tot["em"] += exact_match(t.answer, golds)
        tot["subem"] += substring_exact_match(t.answer, golds)
        tot["f1"] += f1_score(t.answer, golds)
        tot["turns"] += len(t.turns)
        tot["searches"] += t.num_searches
        tot["answered"] += t.answer is not None
    for inp in reward_inputs(trajs):  # what the reward sees: the format checked once, the environment's retrievals
        tot["valid_format"] += inp.valid_format
        tot["retrieval_hit"] += inp.retrieval_hit
    return {"n": n, **{k: v / n for k, v in tot.items()}}


def evaluate_datasets(engine, env, datasets: dict[str, list], params, batch_size: int = 64,
                      progress: bool = False) -> tuple[list[EvalRow], list]:
    """Roll out every question once per dataset; returns one :class:`EvalRow` per dataset + the trajectories."""
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
        rows.append(EvalRow(name, **s))
        all_trajs += trajs
    return rows, all_trajs


def average_row(rows: list[EvalRow]) -> EvalRow:
    """Unweighted mean over datasets (the Search-R1 papers' "Avg." column)."""
    k = max(1, len(rows))
    return EvalRow("average", sum(r.n for r in rows), **{f: sum(getattr(r, f) for r in rows) / k for f in SCORES})


def markdown_table(rows: list[EvalRow]) -> str:
    """The results table in Markdown: scores as fractions in [0, 1] (the trainer's units), turns and searches per
    question."""
    lines = ["| dataset | n | EM | subEM | F1 | turns | searches | answered | valid format | retrieval hit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows + ([average_row(rows)] if len(rows) > 1 else []):
        lines.append(f"| {r.dataset} | {r.n} | {r.em:.3f} | {r.subem:.3f} | {r.f1:.3f} | {r.turns:.2f} | "
                     f"{r.searches:.2f} | {r.answered:.3f} | {r.valid_format:.3f} | {r.retrieval_hit:.3f} |")
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
