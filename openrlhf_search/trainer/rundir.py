"""Run directories: what a fresh start, ``--resume``, ``--resume-or-start`` and ``--overwrite`` do with them.

* fresh (no flag): the directory must not exist or be empty; a directory that already holds files is refused
  (running again would truncate ``metrics.jsonl``, overwrite the summaries and mix checkpoints of two runs).
* ``--resume``: continue from the newest good checkpoint; no checkpoint is an error (exit 2) naming the directory.
* ``--resume-or-start``: resume when there is a checkpoint, else clear the run's outputs and start fresh (what a
  requeued cluster job wants: the first attempt may have been preempted before its first checkpoint).
* ``--overwrite``: remove the run's own outputs (:data:`RUN_OUTPUTS`; other files are left alone) and start fresh.
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "eval_before.json", "config.yaml", "samples", "tb",
               "data", "index", "tokenizer", "rollout_weights", "reward_curve.png", "wandb")
"""Files and directories a run writes into its output directory."""

MODES = ("fresh", "resume", "resume_or_start", "overwrite")


class RunDirError(ValueError):
    """The run directory does not fit the requested start mode (one line, exit 2)."""


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def clear_run_outputs(out: Path) -> list[str]:
    """Delete the run's own outputs in ``out``; returns the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def prepare_run_dir(out: str | Path, mode: str, has_checkpoint) -> bool:
    """Check (and for ``overwrite``/``resume_or_start``, clear) ``out``; returns whether the run resumes.

    Args:
        out: the run directory (``logging.output_dir``).
        mode: one of :data:`MODES`.
        has_checkpoint: ``callable(out) -> bool``, whether a resumable checkpoint exists.

    Raises:
        RunDirError: a fresh start into a non-empty directory, or ``--resume`` with nothing to resume.
    """
    out = Path(out)
    if mode not in MODES:
        raise ValueError(f"run mode {mode!r}: expected one of {MODES}")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"logging.output_dir={str(out)!r} is a file, not a directory")
    if mode == "resume":
        if not out.is_dir():
            raise RunDirError(f"--resume: the run directory {str(out)!r} does not exist (misspelled "
                              "logging.output_dir?); use --resume-or-start to start a new run there")
        if not has_checkpoint(out):
            raise RunDirError(f"--resume: no checkpoint under {str(out / 'checkpoints')!r}; use --resume-or-start "
                              "to start fresh when there is none, or --overwrite to replace the run")
        return True
    if mode == "resume_or_start":
        if out.is_dir() and has_checkpoint(out):
            return True
        if out.is_dir() and (removed := clear_run_outputs(out)):
            print(f"[openrlhf-search] --resume-or-start: no checkpoint in {out}; starting fresh (removed "
                  f"{', '.join(removed)})", flush=True)
        return False
    if mode == "overwrite":
        if out.is_dir() and (removed := clear_run_outputs(out)):
            print(f"[openrlhf-search] --overwrite: removed {', '.join(removed)} from {out}", flush=True)
        return False
    entries = _entries(out)
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunDirError(f"the run directory {str(out)!r} is not empty ({shown}): pass --resume to continue that "
                          "run, --overwrite to replace it, or another logging.output_dir")
    return False
