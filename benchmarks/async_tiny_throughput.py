"""Asynchronous rollouts on the real tiny model on CPU (issue 13): trajectories per second and idle shares.

The local trainer runs ``--steps`` RL steps of the quickstart setup (the tiny 2-layer model, BM25, the synthetic
world) from one warm-start checkpoint, once per schedule:

* ``sync``: the synchronous loop (``rollout.async_producer=false``);
* ``async eta=K``: the producer thread (``rollout.async_producer=true``, ``rollout.max_staleness=K``), partial rollouts
  on, and for ``K = 1`` also off.

Reported per schedule: trajectories/s over the RL phase (``steps x prompts_per_step x group_size / rl_seconds``),
the mean learner idle share (``async/learner_idle_share``) and rollout idle share, mean staleness, and the reward of
the last 5 steps (a sanity check, not a comparison). What it measures is this machine: generation and the update
share the same CPU cores, so overlapping them helps only as far as neither saturates the cores -- unlike a GPU
cluster where the engine and the learner own separate devices (``benchmarks/async_rollout_sim.py`` models that).

    python benchmarks/async_tiny_throughput.py --steps 20                          # ~3 min on an idle 2-core machine
    python benchmarks/async_tiny_throughput.py --checkpoint runs/quickstart/checkpoints/step_000200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SCHEDULES = {
    "sync": ["rollout.async_producer=false"],
    "async eta=1": ["rollout.async_producer=true", "rollout.max_staleness=1"],
    "async eta=1, no partial": ["rollout.async_producer=true", "rollout.max_staleness=1",
                                "rollout.partial_rollouts=false"],
    "async eta=2": ["rollout.async_producer=true", "rollout.max_staleness=2"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--checkpoint", default="benchmarks/results/staleness/warm_start/checkpoints/latest",
                    help="warm-start checkpoint directory (or a 'latest' pointer file); default: the staleness "
                         "study's warm start")
    ap.add_argument("--algorithm", default="grpo+tis")
    ap.add_argument("--out", default="benchmarks/results/async_tiny")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from openrlhf_search.trainer.cli_quickstart import QUICKSTART
    from openrlhf_search.trainer.config import config_from_dict
    from openrlhf_search.trainer.local import train
    from openrlhf_search.trainer.logging import read_metrics

    ckpt = Path(args.checkpoint)
    if ckpt.is_file():  # the 'latest' pointer
        ckpt = (ckpt.parent / ckpt.read_text().strip()).resolve()
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"--checkpoint {ckpt}: not a model checkpoint (run benchmarks/staleness_study.py once, or "
                         "pass a quickstart checkpoint)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [f"model.path={ckpt}", "sft.steps=0", "sft.copy_steps=0", f"steps={args.steps}", "max_step_seconds=0",
            f"algorithm.name={args.algorithm}", "logging.progress=false", "logging.save_every=0",
            "logging.save_every_seconds=0", "logging.rollout_every=0", "logging.sample_every=0"] + list(args.overrides)
    table = {}
    for name, extra in SCHEDULES.items():
        run_dir = out / "runs" / name.replace(" ", "_").replace(",", "").replace("=", "")
        cfg = config_from_dict(QUICKSTART, base + extra + [f"logging.output_dir={run_dir}"])
        t0 = time.perf_counter()
        summary = train(cfg, mode="overwrite")
        rows = read_metrics(run_dir / "metrics.jsonl")
        trajs = args.steps * cfg.rollout.prompts_per_step * cfg.rollout.group_size

        def mean(key, rows=rows):
            xs = [r[key] for r in rows if key in r]
            return statistics.mean(xs) if xs else 0.0

        table[name] = {"trajectories_per_s": trajs / summary["rl_seconds"], "rl_seconds": summary["rl_seconds"],
                       "learner_idle_share": mean("async/learner_idle_share"),
                       "rollout_idle_share": mean("async/rollout_idle_share"),
                       "staleness_mean": mean("rollout/staleness_mean"),
                       "partial_share": mean("rollout/partial_share"),
                       "reward_last5": statistics.mean(r["reward_mean"] for r in rows[-5:]),
                       "wall_seconds": time.perf_counter() - t0}
        print(f"[async-tiny] {name}: {table[name]['trajectories_per_s']:.2f} trajectories/s", flush=True)
    sync = table["sync"]["trajectories_per_s"]
    lines = ["| schedule | trajectories/s | vs sync | learner idle | rollout idle | staleness (mean) | "
             "partial-rollout share | reward, last 5 steps |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in table.items():
        lines.append(f"| {name} | {t['trajectories_per_s']:.2f} | {t['trajectories_per_s'] / sync:.2f}x | "
                     f"{100 * t['learner_idle_share']:.0f}% | {100 * t['rollout_idle_share']:.0f}% | "
                     f"{t['staleness_mean']:.2f} | {t['partial_share']:.2f} | {t['reward_last5']:.3f} |")
    md = "\n".join(lines) + "\n"
    (out / "async_tiny.md").write_text(md)
    (out / "async_tiny.json").write_text(json.dumps(table, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
