"""Peak memory and time of sampled-token log-probs: naive full logits vs chunked ``sampled_token_logprobs``.

Each measurement runs in a fresh subprocess (so allocator caches and earlier peaks cannot leak between them). The
worker builds the inputs, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), runs the
computation once, and reports ``VmHWM - RSS before`` (peak resident memory added by the computation) and the wall
time. Linux only.

    nice -n 10 python benchmarks/logprob_memory.py                       # B=2 T=4096 V=151936 H=896, forward
    nice -n 10 python benchmarks/logprob_memory.py --backward --T 1024  # forward + backward, smaller T

Naive = ``(hidden @ W.T).log_softmax(-1).gather(-1, y)``: with the defaults it holds two 4.98 GB float32 tensors.
Do not run the naive forward+backward at T=4096 on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    B, T, V, H = args.B, args.T, args.V, args.H
    hidden = torch.randn(B, T, H) * 0.5
    weight = torch.randn(V, H) * 0.02
    targets = torch.randint(0, V, (B, T))
    if args.backward:
        hidden.requires_grad_()
        weight.requires_grad_()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    with torch.set_grad_enabled(args.backward):
        if args.mode == "naive":
            logp = (hidden @ weight.T).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        else:
            from openrlhf_search.algorithms import sampled_token_logprobs

            logp = sampled_token_logprobs(hidden, weight, targets, chunk_size=args.chunk_size)
        if args.backward:
            logp.sum().backward()
    elapsed = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    return {
        "mode": args.mode,
        "seconds": elapsed,
        "peak_added_gib": (peak - before) / 2**20,
        "logp_sum": float(logp.detach().double().sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--H", type=int, default=896)
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk for ours (None: auto)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backward", action="store_true", help="also time/measure the backward pass")
    p.add_argument("--modes", default="ours,naive", help="comma-separated subset of ours,naive")
    p.add_argument("--json", action="store_true", help="print one JSON object with all results at the end")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(worker(args)))
        return 0
    print(f"B={args.B} T={args.T} V={args.V} H={args.H} float32 CPU, threads={args.threads}, "
          f"{'forward+backward' if args.backward else 'forward'}")  # fmt: skip
    results = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--threads", str(args.threads)]
        cmd += [f"--{k}={getattr(args, k)}" for k in ("B", "T", "V", "H")]
        cmd += [f"--chunk-size={args.chunk_size}"] if args.chunk_size else []
        cmd += ["--backward"] if args.backward else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed (exit {out.returncode}): {out.stderr[-2000:]}")
            return 1
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:>6}: peak added {r['peak_added_gib']:7.3f} GiB   time {r['seconds']:7.2f} s   "
              f"sum(logp) {r['logp_sum']:.6e}")  # fmt: skip
    if "ours" in results and "naive" in results:
        o, n = results["ours"], results["naive"]
        print(f"ours/naive: memory {o['peak_added_gib'] / n['peak_added_gib']:.3f}x "
              f"(target <= 0.125), time {o['seconds'] / n['seconds']:.2f}x (target <= 1.5)")  # fmt: skip
        rel = abs(o["logp_sum"] - n["logp_sum"]) / abs(n["logp_sum"])
        print(f"relative difference of sum(logp): {rel:.2e}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
