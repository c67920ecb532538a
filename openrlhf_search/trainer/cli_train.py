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
    from openrlhf_search.trainer.config import ConfigError, load_config

    if args.backend == "openrlhf":
        # The OpenRLHF launcher owns the cluster sections (`openrlhf:`, `backend:`, `megatron:`, `megatron_actor:`)
        # of the same YAML; it validates the rest with the trainer's own loader.
        from openrlhf_search.integrations.openrlhf.launch import load_backend, load_configs, run_openrlhf

        try:
            cfg, cluster = load_configs(args.config, args.overrides)
            backend = load_backend(args.config, args.overrides)
        except (ConfigError, ValueError, KeyError) as exc:
            print(f"openrlhf-search train --backend openrlhf: {exc}", file=sys.stderr)
            return 2
        if args.overwrite:
            print("openrlhf-search train --backend openrlhf: --overwrite is not supported; choose a new "
                  "logging.output_dir", file=sys.stderr)  # fmt: skip
            return 2
        if args.resume or args.resume_or_start:  # OpenRLHF's --ckpt.load_enable (openrlhf.resume)
            cluster = dataclasses.replace(cluster, resume=True)
        return int(run_openrlhf(cfg, dry_run=args.dry_run, openrlhf=cluster, backend=backend,
                                require_checkpoint=args.resume) or 0)  # fmt: skip
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        hint = ""
        if any(f"'{key}'" in str(exc) for key in ("openrlhf", "backend", "megatron", "megatron_actor")):
            hint = " (cluster sections are read by `--backend openrlhf`)"
        print(f"openrlhf-search train: {exc}{hint}", file=sys.stderr)
        return 2
    from openrlhf_search.trainer.local import run_mode, train_or_exit_code

    summary = train_or_exit_code(cfg, run_mode(args), "openrlhf-search train")
    if isinstance(summary, int):
        return summary
    print(json.dumps({k: summary[k] for k in ("steps_done", "reward_gain", "eval_before", "eval_after", "checkpoint")
                      if k in summary}, indent=1))
    return 0
