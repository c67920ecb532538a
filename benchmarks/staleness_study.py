"""The staleness study (issue 13): GRPO, DSPO, SAPO and CalibAdv, with and without TIS, trained on stale rollouts.

Question: how do the algorithms behave as the batch they train on was sampled ``k`` policy versions ago, and does
importance-sampling distribution drift (ISDD, the SAPO paper's failure mode: positive-advantage tokens whose ratio
collapses, and a gradient norm that goes to zero) appear? Does SAPO's term or TIS prevent it?

Design (why not the concurrent producer): every run uses the local trainer's ``rollout.max_staleness = k``, which
trains every step on a batch sampled exactly ``k`` versions ago (a deterministic FIFO of ``k + 1`` batches; the
first ``k`` steps are fresh while it fills). That is the *worst case* a staleness bound ``k`` admits, reproducible
bit for bit, and independent of thread timing on a loaded 2-core machine -- what a comparison across algorithms
needs. A concurrent producer (``rollout.async_producer``) mixes staleness ``0..k`` inside a batch, so its effect is
bounded by this one. The proximal log-probs are recomputed with the current weights (decoupled PPO, AReaL's
choice); the engine's log-probs are the behaviour log-probs ``+tis`` corrects with. ``num_minibatches = 4`` (by
default) so that the PPO ratio moves within a step and SAPO's term can be active at all.

Every run starts from one shared supervised warm start. Outputs in ``--out``:

* ``staleness.md`` / ``staleness.json``: per (algorithm, staleness) over seeds: final reward (last 10 steps),
  held-out F1 after RL, collapsed runs, mean drift share (positive-advantage tokens with ratio <= SAPO's t) over the
  last 10 steps and its max, the grad norm of the last 10 steps relative to the first 10 (ISDD's "vanishing
  gradient"), the behaviour/proximal gap (``rollout/engine_logprob_gap``) and, with TIS, the truncated share;
* ``staleness.png``: reward curves per algorithm (one colour per staleness) and the drift/grad-norm diagnostics.

    nice -n 10 python benchmarks/staleness_study.py --seeds 0 1 2 --steps 30            # the full grid, ~1-2 h here
    python benchmarks/staleness_study.py --algorithms grpo --staleness 0 2 --seeds 0 --steps 10   # a smoke run

Runs are sequential and resumable: a finished run's ``summary.json`` is read back instead of rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ALGORITHMS = ["grpo", "grpo+tis", "dspo", "dspo+tis", "sapo", "sapo+tis", "calibadv", "calibadv+tis"]


def _mean(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.mean(xs) if xs else float("nan")


def run_or_load(base: list[str], algo: str, staleness: int, seed: int, run_dir: Path) -> dict:
    """Train one run (or read back a finished one); returns the summary plus the metric rows."""
    from openrlhf_search.trainer.logging import read_metrics

    done = run_dir / "summary.json"
    if not done.exists():
        from openrlhf_search.trainer.cli_quickstart import QUICKSTART
        from openrlhf_search.trainer.config import config_from_dict
        from openrlhf_search.trainer.local import train

        cfg = config_from_dict(QUICKSTART, base + [f"algorithm.name={algo}", f"seed={seed}",
                                                   f"rollout.max_staleness={staleness}",
                                                   f"logging.output_dir={run_dir}"])
        t0 = time.perf_counter()
        summary = train(cfg, mode="overwrite")
        summary["wall_seconds"] = time.perf_counter() - t0
        done.write_text(json.dumps(summary, indent=1))
    summary = json.loads(done.read_text())
    summary["rows"] = read_metrics(run_dir / "metrics.jsonl")
    return summary


def analyse(runs: list[dict], collapse_drop: float) -> dict:
    """Aggregate the seeds of one (algorithm, staleness) cell."""
    finals, f1s, collapsed, drift_last, drift_max, gn_ratio, gaps, trunc = [], [], 0, [], [], [], [], []
    for r in runs:
        rows = r["rows"]
        rewards = [row["reward_mean"] for row in rows]
        w = min(10, max(1, len(rewards) // 2))
        first, last = statistics.mean(rewards[:w]), statistics.mean(rewards[-w:])
        finals.append(last)
        skipped = sum(row.get("update/skipped_nonfinite", 0) or 0 for row in rows)
        collapsed += int(last < first - collapse_drop or skipped > 0)
        f1s.append(r["eval_after"]["f1"])
        drift = [row.get("loss/drift_share") for row in rows]
        drift_last.append(_mean(drift[-w:]))
        drift_max.append(max((d for d in drift if d is not None), default=float("nan")))
        gn = [row.get("update/grad_norm") for row in rows]
        gn_ratio.append(_mean(gn[-w:]) / max(_mean(gn[:w]), 1e-12))
        gaps.append(_mean([row.get("rollout/engine_logprob_gap") for row in rows]))
        trunc.append(_mean([row.get("loss/offpolicy/truncated_share", row.get("offpolicy/truncated_share"))
                            for row in rows]))
    return {"runs": len(runs), "final_reward": _mean(finals), "final_reward_min": min(finals),
            "heldout_f1_after": _mean(f1s), "heldout_f1_before": _mean(r["eval_before"]["f1"] for r in runs),
            "collapsed": collapsed, "drift_share_last": _mean(drift_last), "drift_share_max": _mean(drift_max),
            "grad_norm_last_over_first": _mean(gn_ratio), "behaviour_gap": _mean(gaps),
            "tis_truncated_share": _mean(trunc), "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in runs)}


def markdown(table: dict) -> str:
    lines = ["| algorithm | staleness | runs | final reward (min) | held-out F1 after | collapsed | drift share last "
             "10 (max) | grad norm last/first | behaviour gap (nats/token) | TIS truncated |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (algo, k), t in table.items():
        tr = "-" if t["tis_truncated_share"] != t["tis_truncated_share"] else f"{t['tis_truncated_share']:.4f}"
        lines.append(f"| {algo} | {k} | {t['runs']} | {t['final_reward']:.3f} ({t['final_reward_min']:.3f}) | "
                     f"{t['heldout_f1_after']:.3f} | {t['collapsed']} | {t['drift_share_last']:.4f} "
                     f"({t['drift_share_max']:.4f}) | {t['grad_norm_last_over_first']:.2f} | "
                     f"{t['behaviour_gap']:.4f} | {tr} |")
    return "\n".join(lines) + "\n"


def plot(cells: dict, path: Path, algorithms: list[str], staleness: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_algos = list(dict.fromkeys(a.split("+")[0] for a in algorithms))
    fig, axes = plt.subplots(3, len(base_algos), figsize=(4.2 * len(base_algos), 10), squeeze=False)
    for j, base in enumerate(base_algos):
        for algo in [a for a in algorithms if a.split("+")[0] == base]:
            style = "--" if "+tis" in algo else "-"
            for i, k in enumerate(staleness):
                runs = cells.get((algo, k))
                if not runs:
                    continue
                for row_i, key in enumerate(("reward_mean", "loss/drift_share", "update/grad_norm")):
                    curves = [[row.get(key) for row in r["rows"]] for r in runs]
                    n = min(len(c) for c in curves)
                    ys = [_mean([c[s] for c in curves]) for s in range(n)]
                    if key == "reward_mean":
                        ys = [_mean(ys[max(0, s - 4): s + 1]) for s in range(n)]
                    axes[row_i][j].plot(range(1, n + 1), ys, style, color=f"C{i}",
                                        label=f"{algo} s={k}" if row_i == 0 else None)
        for row_i, title in enumerate(("reward (5-step avg)", "drift share (A>0, ratio <= t)", "grad norm")):
            axes[row_i][j].set_title(f"{base}: {title}", fontsize=9)
            axes[row_i][j].grid(alpha=0.3)
            axes[row_i][j].set_xlabel("RL step")
        axes[0][j].legend(fontsize=7)
    fig.suptitle("Staleness study (solid: plain, dashed: +tis; colour: staleness)")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    ap.add_argument("--staleness", nargs="+", type=int, default=[0, 1, 2, 4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sft-steps", type=int, default=None, help="warm-start steps (default: the quickstart's)")
    ap.add_argument("--collapse-drop", type=float, default=0.1)
    ap.add_argument("--analyse-only", action="store_true",
                    help="only aggregate the finished runs under --out (missing cells are left out, never run)")
    ap.add_argument("--tis-at-zero-every-seed", action="store_true",
                    help="also run the +tis variants at staleness 0 for every seed (default: the first seed only; "
                         "there the engine's log-probs equal the trainer's to ~1e-6 and +tis changes nothing)")
    ap.add_argument("--out", default="benchmarks/results/staleness")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run (k=v); default adds "
                                                 "algorithm.num_minibatches=4")
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from openrlhf_search.trainer.cli_quickstart import QUICKSTART
    from openrlhf_search.trainer.config import config_from_dict
    from openrlhf_search.trainer.local import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    if not any(o.startswith("algorithm.num_minibatches=") for o in overrides):
        overrides.append("algorithm.num_minibatches=4")
    warm = out / "warm_start"
    if not args.analyse_only and not (warm / "checkpoints" / "latest").exists():
        sft = [f"sft.steps={args.sft_steps}"] if args.sft_steps is not None else []
        train(config_from_dict(QUICKSTART, [f"logging.output_dir={warm}", "steps=0", "logging.progress=false"] + sft
                               + overrides), mode="overwrite")
    ckpt = (warm / "checkpoints" / (warm / "checkpoints" / "latest").read_text().strip()).resolve() \
        if not args.analyse_only else Path("unused")
    base = [f"model.path={ckpt}", "sft.steps=0", "sft.copy_steps=0", f"steps={args.steps}", "max_step_seconds=0",
            "logging.progress=false", "logging.save_every=0", "logging.save_every_seconds=0",
            "logging.rollout_every=0", "logging.sample_every=0"] + overrides

    cells: dict = {}
    table: dict = {}
    total = len(args.algorithms) * len(args.staleness) * len(args.seeds)
    n = 0
    for seed in args.seeds:  # seed-major: an interrupted study has every cell at fewer seeds, not fewer cells
        for k in args.staleness:
            for algo in args.algorithms:
                n += 1
                if k == 0 and "+tis" in algo and seed != args.seeds[0] and not args.tis_at_zero_every_seed:
                    continue  # at staleness 0 behaviour = proximal up to ~1e-6: +tis is the identity (seed 0 shows it)
                run_dir = out / "runs" / f"{algo.replace('+', '_')}_s{k}_seed{seed}"
                if args.analyse_only and not (run_dir / "summary.json").exists():
                    continue
                print(f"[staleness {n}/{total}] {algo} staleness {k} seed {seed} -> {run_dir}", flush=True)
                cells.setdefault((algo, k), []).append(run_or_load(base, algo, k, seed, run_dir))
                table = {(a, s): analyse(cells[(a, s)], args.collapse_drop) for a in args.algorithms
                         for s in args.staleness if (a, s) in cells}
                (out / "staleness.json").write_text(json.dumps({f"{a}@{s}": v for (a, s), v in table.items()},
                                                               indent=1))
                (out / "staleness.md").write_text(markdown(table))
    plot(cells, out / "staleness.png", args.algorithms, args.staleness)
    print(markdown(table))
    print(f"wrote {out / 'staleness.md'}, {out / 'staleness.json'}, {out / 'staleness.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
