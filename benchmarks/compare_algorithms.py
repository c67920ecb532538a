"""Compare RL algorithms (grpo, dspo, sapo, calibadv, ...) on the synthetic search benchmark, on CPU.

Every run starts from the same supervised warm start (trained once, ``--sft-steps``), so the algorithms differ only
in what RL does. For each algorithm and seed the local trainer runs ``--steps`` RL steps; the script then writes
into ``--out``:

* ``algorithms.png`` -- reward curves (mean over seeds, min-max band) and stability diagnostics (ratio range,
  clip fraction, SAPO drift share, held-out F1 before/after);
* ``algorithms.md`` / ``algorithms.json`` -- per algorithm: steps to reach ``--level`` (5-step moving average of
  ``reward_mean``), final reward (last 10 steps), held-out EM/F1 after RL, collapsed runs, and the share of wall time
  in generation / retrieval / update / environment / other.

A run counts as *collapsed* when its last-10-step reward is more than ``--collapse-drop`` below its first-10-step
reward, or when any update was skipped for a non-finite loss/gradient.

    python benchmarks/compare_algorithms.py --algorithms grpo dspo sapo calibadv --seeds 0 1 --steps 40
    python benchmarks/compare_algorithms.py --sapo-grid       # also runs sapo with several (threshold, coef)

Runs are sequential in one process (CPU; run under ``nice`` on a shared machine). Timing figures depend on the
machine's load: they are measured, not modelled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _moving(xs, w=5):
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def run_one(base_overrides: list[str], algo: str, seed: int, out: Path, extra: list[str]) -> dict:
    from openrlhf_search.trainer.cli_quickstart import QUICKSTART
    from openrlhf_search.trainer.config import config_from_dict
    from openrlhf_search.trainer.local import train
    from openrlhf_search.trainer.logging import read_metrics

    overrides = base_overrides + [f"algorithm.name={algo}", f"seed={seed}", f"logging.output_dir={out}"] + extra
    cfg = config_from_dict(QUICKSTART, overrides)
    t0 = time.perf_counter()
    summary = train(cfg)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["rows"] = read_metrics(out / "metrics.jsonl")
    return summary


def analyse(runs: dict[str, list[dict]], level: float, collapse_drop: float) -> dict:
    table = {}
    for algo, rs in runs.items():
        steps_to, finals, ems, f1s, collapsed = [], [], [], [], 0
        time_split = {"generation": 0.0, "retrieval": 0.0, "update": 0.0, "env": 0.0, "other": 0.0}
        wall = 0.0
        for r in rs:
            rewards = [row["reward_mean"] for row in r["rows"]]
            mv = _moving(rewards)
            hit = next((row["step"] for row, m in zip(r["rows"], mv) if m >= level), None)
            steps_to.append(hit)
            w = min(10, max(1, len(rewards) // 2))
            first, last = statistics.mean(rewards[:w]), statistics.mean(rewards[-w:])
            finals.append(last)
            skipped = sum(row.get("update/skipped_nonfinite", 0) or 0 for row in r["rows"])
            collapsed += int(last < first - collapse_drop or skipped > 0)
            ems.append(r["eval_after"]["em"])
            f1s.append(r["eval_after"]["f1"])
            for k in time_split:
                time_split[k] += sum(row.get(f"time/{k}", 0.0) for row in r["rows"])
            wall += r["wall_seconds"]
        step_time = sum(time_split.values())
        reached = [s for s in steps_to if s is not None]
        table[algo] = {
            "runs": len(rs),
            "steps_to_level": statistics.mean(reached) if reached else None,
            "runs_reaching_level": len(reached),
            "final_reward": statistics.mean(finals),
            "heldout_em_after": statistics.mean(ems),
            "heldout_f1_after": statistics.mean(f1s),
            "heldout_f1_before": statistics.mean(r["eval_before"]["f1"] for r in rs),
            "collapsed": collapsed,
            "time_share_of_rl_steps": {k: v / step_time if step_time else 0.0 for k, v in time_split.items()},
            "rl_step_seconds": step_time / max(1, sum(len(r["rows"]) for r in rs)),
            "wall_seconds": wall,
        }
    return table


def markdown(table: dict, level: float) -> str:
    lines = [f"| algorithm | runs | steps to reward {level} (reached) | final reward | held-out F1 before -> after | "
             "held-out EM after | collapsed | gen / retr / update / env / other (% of RL step time) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for algo, t in table.items():
        s = t["time_share_of_rl_steps"]
        steps = "-" if t["steps_to_level"] is None else f"{t['steps_to_level']:.0f}"
        lines.append(f"| {algo} | {t['runs']} | {steps} ({t['runs_reaching_level']}/{t['runs']}) | "
                     f"{t['final_reward']:.3f} | {t['heldout_f1_before']:.3f} -> {t['heldout_f1_after']:.3f} | "
                     f"{t['heldout_em_after']:.3f} | {t['collapsed']} | "
                     + " / ".join(f"{100 * s[k]:.0f}" for k in ("generation", "retrieval", "update", "env", "other"))
                     + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward_mean", "reward_mean (5-step avg)"), ("loss/ratio_max", "max importance ratio"),
            ("loss/clip_frac_low", "clip fraction (low)"), ("loss/drift_share", "drift share (ratio <= t, A >= 0)")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = {algo: f"C{i}" for i, algo in enumerate(runs)}  # one color per algorithm in every panel
    nan = float("nan")
    for ax, (key, title) in zip(axes.flat, keys):
        for algo, rs in runs.items():
            curves = [[row.get(key) for row in r["rows"]] for r in rs]
            n = min(len(c) for c in curves)
            # a step without an update (every group filtered out) has no loss metrics: a gap, not a dropped curve
            steps = [[c[i] for c in curves if c[i] is not None] for i in range(n)]
            if not any(steps):
                continue
            mean = [statistics.mean(v) if v else nan for v in steps]
            lo = [min(v) if v else nan for v in steps]
            hi = [max(v) if v else nan for v in steps]
            xs = list(range(1, n + 1))
            if key == "reward_mean":
                mean, lo, hi = _moving(mean), _moving(lo), _moving(hi)
            ax.plot(xs, mean, label=algo, color=colors[algo])
            ax.fill_between(xs, lo, hi, color=colors[algo], alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", nargs="+", default=["grpo", "dspo", "sapo", "calibadv"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sft-steps", type=int, default=None, help="warm-start steps (default: the quickstart's)")
    ap.add_argument("--level", type=float, default=0.4, help="reward level for the steps-to-level column")
    ap.add_argument("--collapse-drop", type=float, default=0.1)
    ap.add_argument("--sapo-grid", action="store_true", help="also run sapo at several (threshold, coef)")
    ap.add_argument("--out", default="benchmarks/results/algorithms")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run (k=v)")
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from openrlhf_search.trainer.cli_quickstart import QUICKSTART
    from openrlhf_search.trainer.config import config_from_dict
    from openrlhf_search.trainer.local import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. one shared warm start: SFT only (steps=0 RL), then every run loads its checkpoint
    warm = out / "warm_start"
    if not (warm / "checkpoints" / "latest").exists():
        sft = [f"sft.steps={args.sft_steps}"] if args.sft_steps is not None else []
        cfg = config_from_dict(QUICKSTART, [f"logging.output_dir={warm}", "steps=0", "logging.progress=false"] + sft
                               + list(args.overrides))
        train(cfg)
    ckpt = (warm / "checkpoints" / (warm / "checkpoints" / "latest").read_text().strip()).resolve()
    base = [f"model.path={ckpt}", "sft.steps=0", "sft.copy_steps=0", f"steps={args.steps}", "max_step_seconds=0",
            "logging.progress=false", "logging.save_every=0"] + list(args.overrides)

    variants = [(a, a, []) for a in args.algorithms]
    if args.sapo_grid:
        for t, w in ((0.5, 0.1), (0.5, 0.5), (0.8, 0.1), (0.3, 0.1)):
            variants.append((f"sapo(t={t},w={w})", "sapo", [f"algorithm.loss_overrides={{sapo_threshold: {t}, "
                                                            f"sapo_coef: {w}}}"]))
    runs: dict[str, list[dict]] = {}
    for label, algo, extra in variants:
        for seed in args.seeds:
            run_dir = out / f"{label.replace(',', '_').replace('=', '')}_seed{seed}"
            print(f"[compare] {label} seed {seed} -> {run_dir}", flush=True)
            runs.setdefault(label, []).append(run_one(base, algo, seed, run_dir, extra))
    table = analyse(runs, args.level, args.collapse_drop)
    (out / "algorithms.json").write_text(json.dumps(table, indent=1))
    (out / "algorithms.md").write_text(markdown(table, args.level))
    plot(runs, out / "algorithms.png")
    print(markdown(table, args.level))
    print(f"wrote {out / 'algorithms.md'}, {out / 'algorithms.json'}, {out / 'algorithms.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
