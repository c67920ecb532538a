"""``openrlhf-search train``: RL training from a YAML config + overrides, on the backend the config (or ``--backend``)
selects.

    openrlhf-search train --config examples/configs/quickstart.yaml rollout.group_size=4 logging.output_dir=runs/x
    openrlhf-search train --config F --resume          # continue from <output_dir>/checkpoints/latest
    openrlhf-search train --config F --backend openrlhf --dry-run

Every backend runs the same three steps (:mod:`openrlhf_search.backends`): validate (every problem of every section
at once, exit 2), plan (printed by ``--dry-run``), run.
"""

from __future__ import annotations

import argparse
import os

from openrlhf_search.backends import BACKENDS, RunOptions
from openrlhf_search.trainer.validate import load_and_validate


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
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="where to train, overriding the config's backend: local (this process), openrlhf "
                             "(Ray + vLLM + OpenRLHF's actors), megatron (OpenRLHF with Megatron actors) or one a "
                             "plugin registers")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and print what would run, run nothing")


def run_mode(args: argparse.Namespace) -> str:
    """The run-directory mode of the CLI flags."""
    if getattr(args, "resume", False):
        return "resume"
    if getattr(args, "resume_or_start", False):
        return "resume_or_start"
    return "overwrite" if getattr(args, "overwrite", False) else "fresh"


def run(args: argparse.Namespace) -> int:
    # Sleep instead of spinning in OpenMP barriers: on a shared 2-core machine spinning threads made the update
    # ~10x slower under contention; must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    prog = "openrlhf-search train" + (f" --backend {args.backend}" if args.backend else "")
    options = RunOptions(mode=run_mode(args), dry_run=args.dry_run, prog=prog)
    # one loader and one validation pass for every backend: all problems at once, before any expensive work
    cfg = load_and_validate(args.config, args.overrides, backend=args.backend, prog=prog,
                            check_files=not args.dry_run)  # a dry run may be planned before the data exists
    if cfg is None:
        return 2
    backend = BACKENDS.get(cfg.backend)
    plan = backend.plan(cfg, options)
    if args.dry_run:
        print(plan.render())
        return 0
    return int(backend.run(plan, options) or 0)
