"""``openrlhf-search train``: local RL training (or the OpenRLHF backend) from a YAML config + overrides.

    openrlhf-search train --config examples/configs/quickstart.yaml rollout.group_size=4 logging.output_dir=runs/x
    openrlhf-search train --config F --resume          # continue from <output_dir>/checkpoints/latest
    openrlhf-search train --config F --backend openrlhf --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (examples/configs/*.yaml); defaults if omitted")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optimizer.lr=3e-4 rollout.group_size=4")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="resume from the newest good checkpoint of output_dir (an error when there is none)")
    start.add_argument("--resume-or-start", action="store_true",
                       help="resume when output_dir has a checkpoint, else start fresh there (requeued jobs)")
    start.add_argument("--overwrite", action="store_true",
                       help="remove the run outputs already in output_dir and start fresh")
    parser.add_argument("--backend", choices=("local", "openrlhf"), default="local",
                        help="local (this process, HF/vLLM rollouts) or openrlhf (Ray + vLLM + DeepSpeed)")
    parser.add_argument("--dry-run", action="store_true", help="openrlhf backend: print the launch command only")


def run(args: argparse.Namespace) -> int:
    # Sleep instead of spinning in OpenMP barriers: on a shared 2-core machine spinning threads made the update
    # ~10x slower under contention (measured here); must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from openrlhf_search.trainer.validate import load_and_validate

    # one loader and one validation pass for every backend: all problems at once, before any expensive work
    prog = "openrlhf-search train" + (" --backend openrlhf" if args.backend == "openrlhf" else "")
    cfg = load_and_validate(args.config, args.overrides, backend=args.backend, prog=prog,
                            check_files=not args.dry_run)  # a dry run may be planned before the data exists
    if cfg is None:
        return 2
    if args.backend == "openrlhf":
        from openrlhf_search.integrations.openrlhf.launch import run_openrlhf

        if args.overwrite:
            print("openrlhf-search train --backend openrlhf: --overwrite is not supported; choose a new "
                  "logging.output_dir", file=sys.stderr)  # fmt: skip
            return 2
        if args.resume or args.resume_or_start:  # OpenRLHF's --ckpt.load_enable (openrlhf.resume)
            cfg.openrlhf = dataclasses.replace(cfg.openrlhf, resume=True)
        return int(run_openrlhf(cfg, dry_run=args.dry_run, require_checkpoint=args.resume) or 0)
    from openrlhf_search.trainer.local import run_mode, train_or_exit_code

    summary = train_or_exit_code(cfg, run_mode(args), "openrlhf-search train")
    if isinstance(summary, int):
        return summary
    print(json.dumps({k: summary[k] for k in ("steps_done", "reward_gain", "eval_before", "eval_after", "checkpoint")
                      if k in summary}, indent=1))
    return 0
