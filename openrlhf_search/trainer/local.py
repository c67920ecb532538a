"""The local trainer: one process, one readable loop (CPU or one GPU).

``openrlhf-search train --config examples/configs/quickstart.yaml`` runs :func:`train`, which reads top to bottom::

    setup: data, retriever, tokenizer + policy (+ optional SFT warm start), environment, engine, algorithm
    for step in range(start, steps):
        1. rollout     G samples per question, all turns batched, one retrieval call per turn     (rollout.runner)
        2. reward      F1/EM x format on the final <answer>                                       (rewards)
        3. filter      DSPO/DAPO: keep mixed-outcome groups, resample until the batch is full      (GroupBatcher)
        4. advantages  group-relative (GRPO/Dr.GRPO/RLOO), optionally CalibAdv per token           (algorithms)
        5. old log-probs: recomputed by the trainer, no grad, before any update (see below)
        6. updates     ppo_epochs x num_minibatches steps of the preset's loss (+ KL to a reference if configured),
                       NaN/inf guard, gradient clipping, LR schedule
        7. log / sample / checkpoint

Old log-probs. The importance ratios use log-probs recomputed by the trainer with the same weights, the same
temperature and the same padding as the update's forward pass, not the engine's: engine and trainer numerics differ
(KV cache vs full forward, vLLM kernels, bf16), and mixing them biases the ratio away from 1 at the first
minibatch. The engine's log-probs are kept as a diagnostic (``rollout/engine_logprob_gap``, mean absolute
difference on model tokens), which also catches a rollout engine that stopped receiving weight updates.

The tiny quickstart model shares its weights with the HF engine (no copy); vLLM engines receive the weights through
``update_weights`` after each optimizer step.
"""

from __future__ import annotations

import collections
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openrlhf_search.trainer.config import TrainConfig, config_to_dict, save_config
from openrlhf_search.trainer.models import build_optimizer


class RetrieverDownError(RuntimeError):
    """The retriever failed (after the client's own retries); the step cannot continue."""


# ============================================================================================ setup helpers
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str, env: dict | None = None):
    """``auto``: CUDA when available, else the CPU -- said loudly inside a Slurm job (``SLURM_JOB_ID``), where a CPU
    fallback almost always means the job did not request a GPU (``--gpus``/``--gres=gpu:1``) on a cluster that
    enforces allocations, and the run would silently take hours instead of minutes."""
    import os
    import sys

    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        env = os.environ if env is None else env
        if env.get("SLURM_JOB_ID"):
            print(f"[openrlhf-search] WARNING: device=auto found no CUDA GPU in Slurm job {env['SLURM_JOB_ID']} "
                  f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}): training on the CPU. "
                  "Request a GPU (sbatch --gpus=1 or --gres=gpu:1), or set device=cpu to silence this.",
                  file=sys.stderr, flush=True)  # fmt: skip
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    """``auto``: bf16 on CUDA devices that support it, else float32 (CPU training stays in float32)."""
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


@dataclass
class World:
    """Everything the loop needs, built once by :func:`build_world`."""

    cfg: TrainConfig
    out: Path
    device: Any
    tokenizer: Any
    policy: Any
    engine: Any
    env: Any
    reward_fn: Any
    train_samples: list
    eval_samples: list
    retriever: Any
    timer: Any
    kb: Any = None
    extra: dict = field(default_factory=dict)


def load_questions(cfg: TrainConfig, out: Path):
    """``(train, eval, kb)``: the synthetic KB's splits (written to ``<out>/data``) or the configured files."""
    if cfg.data.source == "synthetic":
        from openrlhf_search.data.synthetic import generate_kb, write_kb

        kb = generate_kb(seed=cfg.data.seed, n_entities=cfg.data.num_entities,
                         two_hop_fraction=cfg.data.two_hop_fraction)
        write_kb(kb, out / "data")
        return kb.train[: cfg.data.num_train], kb.test[: cfg.data.num_eval], kb
    if cfg.data.source == "files":
        if not cfg.data.train_files:
            raise ValueError("data.source=files needs data.train_files")
        train = read_question_files(cfg.data.train_files, cfg, "data.train_files")[: cfg.data.num_train]
        evals = read_question_files(cfg.data.eval_files, cfg, "data.eval_files")[: cfg.data.num_eval]
        return train, evals, None
    raise ValueError(f"data.source={cfg.data.source!r}: expected 'synthetic' or 'files'")


def read_question_files(files: list[str], cfg: TrainConfig, field_name: str) -> list:
    """The questions of ``files`` with the question-length cap applied; data errors are ``DatasetFormatError``
    (one line naming file, line and field)."""
    from openrlhf_search.data.formats import DatasetFormatError, limit_question_length, read_dataset

    out = []
    for f in files:
        try:
            samples = read_dataset(f)
        except FileNotFoundError as exc:
            raise DatasetFormatError(f"{field_name}: {exc}") from None
        except (KeyError, ValueError) as exc:
            if isinstance(exc, DatasetFormatError):
                raise
            raise DatasetFormatError(f"{field_name}: {exc}") from None
        samples, changed = limit_question_length(samples, str(f), cfg.data.max_question_chars,
                                                 cfg.data.long_questions)
        if changed:
            print(f"[openrlhf-search] {f}: {changed} question(s) over data.max_question_chars="
                  f"{cfg.data.max_question_chars} {cfg.data.long_questions.rstrip('e')}ed", flush=True)
        out += samples
    return out


def build_demo_worlds(cfg: TrainConfig, kb) -> list:
    """The fresh synthetic worlds of the warm start's demonstrations (``sft.demo_worlds``; [] when 0)."""
    if cfg.sft.demo_worlds <= 0 or cfg.model.path != "tiny" or (cfg.sft.steps <= 0 and cfg.sft.copy_steps <= 0):
        return []
    if kb is None:
        raise ValueError("sft.demo_worlds > 0 needs data.source=synthetic")
    from openrlhf_search.data.synthetic import fresh_worlds

    return fresh_worlds(kb, cfg.sft.demo_worlds, cfg.data.num_entities, cfg.data.two_hop_fraction,
                        seed=cfg.data.seed + 1000)


def build_retriever(cfg: TrainConfig, out: Path, kb):
    """The configured retriever, or a BM25 index over the synthetic corpus built into ``<out>/index`` (loaded when it
    is there already: ``kb`` may then be None, as for ``openrlhf-search eval`` of a run)."""
    from openrlhf_search.retrieval import load_retriever
    from openrlhf_search.retrieval.cache import with_cache

    rc = cfg.retriever
    if rc.spec or rc.cache_mode == "replay":
        http = rc.spec.startswith(("http://", "https://"))
        return load_retriever(rc.spec or None, token=rc.token, cache=rc.cache or None, cache_mode=rc.cache_mode,
                              **({"timeout": rc.timeout} if http else {}))
    index_dir = out / "index"
    if kb is None and not (index_dir / "manifest.json").exists():  # eval of a run reuses the run's own index
        raise ValueError("retriever.spec is empty and data.source is not synthetic: give an index dir or URL")
    from openrlhf_search.retrieval.bm25 import BM25Config, BM25Index, BM25Retriever

    if not (index_dir / "manifest.json").exists():
        BM25Index.build(out / "data" / "corpus.jsonl", index_dir, config=BM25Config(), show_progress=False)
    # numpy backend: on a few hundred passages it answers in well under a millisecond, while numba's first call
    # spends ~12 s compiling (a large share of a 10-minute CPU budget).
    return with_cache(BM25Retriever(BM25Index.load(index_dir, backend="numpy"), n_threads=1), rc.cache or None,
                      rc.cache_mode)


def probe_retriever(retriever, spec: str) -> None:
    """One query before any training: a retriever that is down fails the run at once (after the client's retries),
    not after minutes of warm-up."""
    try:
        retriever.search(["health check"], 1)
    except Exception as exc:
        if _is_retrieval_failure(exc):
            raise RetrieverDownError(f"retriever {spec or '(built-in BM25)'} is not answering: {exc}") from exc
        raise


def build_tokenizer_and_model(cfg: TrainConfig, out: Path, kb, train_samples, device, resume_dir: Path | None,
                              worlds: list | None = None):
    """Tokenizer + policy: from the resume checkpoint, a pretrained path, or the tiny random-init Qwen2.

    The tiny tokenizer is trained on the KB's passages plus the questions of the demonstration ``worlds`` when there
    are any (else the training questions, which repeat each training name ~10 times and so give many of them a
    token of their own: a model that learned to copy multi-token names then fails on exactly those).
    """
    import torch

    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2, load_pretrained, load_tokenizer

    dtype = resolve_dtype(cfg.model.dtype, device)
    if resume_dir is not None:
        from transformers import AutoModelForCausalLM

        tok = load_tokenizer(resume_dir)  # exactly the run's tokenizer (AutoTokenizer would rebuild the tiny one)
        model = AutoModelForCausalLM.from_pretrained(str(resume_dir), dtype=dtype)
    elif cfg.model.path == "tiny":
        from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer

        texts = [d.contents for d in kb.corpus] if kb is not None else []
        questions = [s.question for w in worlds for s in w.train] if worlds else [s.question for s in train_samples]
        texts += [d.contents for w in worlds or () for d in w.corpus] + questions
        from openrlhf_search.env.templates import get_template

        tmpl = get_template(cfg.env.template)
        texts += [tmpl.render(q) for q in questions[:50]]
        tok = build_tiny_tokenizer(texts, vocab_size=cfg.model.vocab_size, out_dir=out / "tokenizer")
        spec = TinyModelSpec(cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads, cfg.model.num_kv_heads,
                             cfg.model.intermediate_size)
        model = build_tiny_qwen2(tok, spec, seed=cfg.model.seed).to(dtype)
    else:
        model, tok = load_pretrained(cfg.model.path, dtype=str(dtype).replace("torch.", ""))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device)
    model.config.use_cache = True
    torch.set_float32_matmul_precision("high")
    return tok, model


def build_env(cfg: TrainConfig, tokenizer, retriever):
    from openrlhf_search.env.search_env import SearchEnv
    from openrlhf_search.trainer.config import search_env_config

    return SearchEnv(tokenizer, retriever, cfg.env.template, search_env_config(cfg))


def build_engine(cfg: TrainConfig, policy, tokenizer, out: Path):
    if cfg.rollout.engine == "hf":
        from openrlhf_search.rollout.hf import HFEngine

        return HFEngine(policy, tokenizer, seed=cfg.seed)
    if cfg.rollout.engine == "vllm":
        from openrlhf_search.rollout.vllm import VLLMEngine

        path = out / "rollout_weights"
        policy.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
        return VLLMEngine(str(path), seed=cfg.seed, dtype=str(next(policy.parameters()).dtype).replace("torch.", ""))
    raise ValueError(f"rollout.engine={cfg.rollout.engine!r}: expected 'hf' or 'vllm'")


# ============================================================================================ scoring / tensors
def score_trajectories(trajs, reward_fn, tokenizer) -> tuple[list[float], list[dict]]:
    """Reward of each trajectory: one batched call of the reward every backend makes
    (``env.scoring.score_trajectories``: the answer the environment accepted, its one format check)."""
    from openrlhf_search.env.scoring import score_trajectories as score_batch

    del tokenizer  # the trajectory carries its decoded turns
    scored = score_batch(trajs, reward_fn)
    return [r for r, _ in scored], [info for _, info in scored]


@dataclass
class PackedBatch:
    """Trajectories as right-padded tensors; the response axis starts at each row's own prompt end."""

    input_ids: Any  # [B, L] prompt + response, right padded
    attention_mask: Any  # [B, L]
    response_index: Any  # [B, T] positions (in L) of the response tokens; padded entries point at 0
    action_mask: Any  # [B, T] 1 on model tokens
    engine_logprobs: Any  # [B, T]
    response_len: list[int]
    token_versions: Any = None  # [B, T] long, sampling version per token (-1: observation/pad); async runs only
    version: int | None = None  # the learner's version these rows are trained at (async runs only)


def pack(trajs, pad_id: int, device) -> PackedBatch:
    """Right-pad ``prompt + response`` per row; ``response_index`` gathers the response axis ``T``."""
    import torch

    B = len(trajs)
    L = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    T = max(1, max(len(t.response_ids) for t in trajs))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    index = torch.zeros((B, T), dtype=torch.long)
    amask = torch.zeros((B, T), dtype=torch.float32)
    elp = torch.zeros((B, T), dtype=torch.float32)
    for i, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t.response_ids)
        ids[i, : p + r] = torch.tensor(list(t.prompt_ids) + list(t.response_ids))
        attn[i, : p + r] = 1
        index[i, :r] = torch.arange(p, p + r)
        amask[i, :r] = torch.tensor(list(t.action_mask), dtype=torch.float32)
        elp[i, :r] = torch.tensor([float(x) for x in t.logprobs], dtype=torch.float32)
    versions = None
    if any(getattr(t, "token_versions", None) is not None for t in trajs):
        versions = torch.full((B, T), -1, dtype=torch.long)
        for i, t in enumerate(trajs):
            if t.token_versions:
                versions[i, : len(t.token_versions)] = torch.tensor(t.token_versions, dtype=torch.long)
        versions = versions.to(device)
    return PackedBatch(ids.to(device), attn.to(device), index.to(device), amask.to(device), elp.to(device),
                       [len(t.response_ids) for t in trajs], versions)


def response_logprobs(model, batch: PackedBatch, rows, temperature: float):
    """Log-probs ``[b, T]`` of the response tokens of ``rows`` under ``model`` (logits / temperature).

    Uses ``algorithms.sampled_token_logprobs`` on the final hidden states, so the full ``[B, L, V]`` float32
    log-softmax is never materialised (it would be 1.9 GB for SmolLM2's 49k vocabulary at 32 x 300 tokens).
    """
    import torch

    from openrlhf_search.algorithms.logprobs import sampled_token_logprobs
    from openrlhf_search.trainer.lora import base_model

    model = base_model(model)  # a LoRA policy: the transformers model inside peft's wrapper (adapters injected)
    ids, attn, index = batch.input_ids[rows], batch.attention_mask[rows], batch.response_index[rows]
    width = int(attn.sum(-1).max().item())
    ids, attn = ids[:, :width], attn[:, :width]
    out = model.model(input_ids=ids, attention_mask=attn, use_cache=False)
    hidden = out.last_hidden_state  # [b, L, H]
    # the token at position p is predicted by the hidden state at p - 1
    pred_pos = (index - 1).clamp(min=0)
    h = hidden.gather(1, pred_pos[:, :, None].expand(-1, -1, hidden.size(-1)))  # [b, T, H]
    targets = ids.gather(1, index.clamp(max=width - 1))
    weight = model.get_output_embeddings().weight
    bias = getattr(model.get_output_embeddings(), "bias", None)
    lp = sampled_token_logprobs(h, weight, targets, bias=bias, temperature=temperature if temperature > 0 else 1.0)
    return lp.float() if lp.dtype != torch.float32 else lp


def setup_lora(cfg: TrainConfig, policy, out: Path, resume_dir: Path | None):
    """Wrap ``policy`` with LoRA (:mod:`.lora`): a fresh run freezes and saves its base once; a resumed run restores
    the saved base and the checkpoint's adapter, so it continues from exactly the weights it stopped with."""
    from openrlhf_search.trainer import lora

    m = cfg.model
    if resume_dir is None:
        lora.save_base(policy, out)
    else:
        lora.load_base(policy, out)
    policy = lora.apply_lora(policy, m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
    if resume_dir is not None:
        lora.load_adapter(policy, resume_dir / lora.ADAPTER_DIR)
    return policy


# ============================================================================================ evaluation
def evaluate_policy(engine, env, samples, tokenizer, params, rollouts_path: Path | None = None) -> dict[str, float]:
    """Single (greedy by default) rollouts over ``samples``: EM, subEM, F1 of the final answer, turns, searches.

    ``rollouts_path``: also write the trajectories there (the rows ``openrlhf-search eval`` writes).
    """
    from openrlhf_search.rollout.runner import run_rollouts
    from openrlhf_search.trainer.evaluate import score_rollouts

    del tokenizer
    if not samples:
        return {}
    trajs = run_rollouts(engine, env, samples, 1, params)
    if rollouts_path is not None:
        with open(rollouts_path, "w", encoding="utf-8") as fh:
            for t in trajs:
                fh.write(json.dumps(t.to_dict(), default=str) + "\n")
    return score_rollouts(trajs)


# ============================================================================================ the loop
def train(cfg: TrainConfig, resume: bool = False, mode: str | None = None) -> dict:
    """Run (or resume) a local RL run; returns a summary dict (also written to ``<output_dir>/summary.json``).

    ``mode`` (:mod:`~openrlhf_search.trainer.rundir`): ``fresh`` (default; refuses a non-empty run directory),
    ``resume`` (the default when ``resume=True``), ``resume_or_start`` or ``overwrite``. SIGTERM/SIGINT checkpoint
    at the end of the current step and raise :class:`~openrlhf_search.trainer.preemption.Preempted`.
    """
    from openrlhf_search.trainer.preemption import PreemptionGuard

    with PreemptionGuard() as guard:
        return _train(cfg, mode or ("resume" if resume else "fresh"), guard)


def _train(cfg: TrainConfig, mode: str, guard) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from openrlhf_search.algorithms.advantages import get_advantage_estimator
    from openrlhf_search.algorithms.postprocess import apply_postprocessors, needs_records
    from openrlhf_search.algorithms.presets import advantage_pipeline, preset_for
    from openrlhf_search.plugins import load_plugins
    from openrlhf_search.retrieval.metrics import retrieval_metrics
    from openrlhf_search.rewards import get_reward_fn
    from openrlhf_search.rollout.base import SamplingParams
    from openrlhf_search.rollout.runner import PhaseTimer, TimedRetriever, collect_groups
    from openrlhf_search.trainer.checkpoint import (
        capture_rng_state,
        checkpoint_candidates,
        find_resume_checkpoint,
        restore_rng_state,
        save_checkpoint,
    )
    from openrlhf_search.trainer.data import QuestionStream
    from openrlhf_search.trainer.logging import MetricsLogger, Progress, plot_reward_curve, render_trajectory
    from openrlhf_search.trainer.lora import trainable_summary
    from openrlhf_search.trainer.preemption import Preempted, SkipMonitor
    from openrlhf_search.trainer.rundir import prepare_run_dir

    hf_logging.disable_progress_bar()
    load_plugins(cfg.plugins)  # before any name is resolved
    t_setup = time.perf_counter()
    out = Path(cfg.logging.output_dir)
    resuming = prepare_run_dir(out, mode, lambda d: bool(checkpoint_candidates(d / "checkpoints")))
    out.mkdir(parents=True, exist_ok=True)
    resume_dir, resume_state = (find_resume_checkpoint(out / "checkpoints") or (None, None)) if resuming else (None,
                                                                                                              None)
    if resume_dir is not None:  # what a signal during set-up leaves to resume
        guard.saved = (resume_dir, int(resume_state["step"]))
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    save_config(cfg, out / "config.yaml")

    # ---- data, retriever, tokenizer, policy, environment, engine
    train_samples, eval_samples, kb = load_questions(cfg, out)
    timer = PhaseTimer()
    retriever = TimedRetriever(build_retriever(cfg, out, kb), timer)
    probe_retriever(retriever, cfg.retriever.spec)
    worlds = build_demo_worlds(cfg, kb) if resume_dir is None else []
    tokenizer, policy = build_tokenizer_and_model(cfg, out, kb, train_samples, device, resume_dir, worlds)
    env = build_env(cfg, tokenizer, retriever)
    engine = build_engine(cfg, policy, tokenizer, out)
    reward_fn = get_reward_fn(cfg.env.reward, **cfg.env.reward_kwargs)
    sample_params = SamplingParams(max_new_tokens=cfg.env.max_tokens_per_turn, temperature=cfg.rollout.temperature,
                                   top_p=cfg.rollout.top_p)
    eval_params = replace_params(sample_params, temperature=cfg.rollout.eval_temperature)
    summary: dict[str, Any] = {"output_dir": str(out)}

    # ---- supervised warm start (fresh runs only) and the held-out score before RL
    if resume_dir is None and (cfg.sft.steps > 0 or cfg.sft.copy_steps > 0):
        guard.phase = "the warm start"
        summary["sft"] = warm_start(cfg, policy, tokenizer, env, kb, retriever, worlds)
        engine.update_weights(policy)  # an engine holding its own copy (vLLM) was built from the pre-SFT weights
    if resume_dir is None:
        guard.phase = "the held-out evaluation before RL"
        summary["eval_before"] = evaluate_policy(engine, env, eval_samples, tokenizer, eval_params)
        (out / "eval_before.json").write_text(json.dumps(summary["eval_before"], indent=1))
    else:
        summary["eval_before"] = json.loads((out / "eval_before.json").read_text())
    if cfg.model.lora_rank > 0:  # parameter-efficient RL: adapters on the (warm-started) policy
        policy = setup_lora(cfg, policy, out, resume_dir)
        engine.update_weights(policy)
        summary["params"] = trainable_summary(policy)

    # ---- algorithm
    preset = preset_for(cfg.algorithm)  # name (+ policy_loss override), the same resolution on every backend
    loss_cfg = dict(cfg.algorithm.loss_overrides)
    if cfg.algorithm.kl_coef > 0:
        loss_cfg.update(kl_coef=cfg.algorithm.kl_coef, kl_estimator=cfg.algorithm.kl_estimator)
    loss_fn = preset.build_loss(**loss_cfg)
    estimator_name, estimator_cfg, adv_chain = advantage_pipeline(preset, cfg.algorithm)  # same on every backend
    estimator = get_advantage_estimator(estimator_name, **estimator_cfg)
    reference = None
    if cfg.algorithm.kl_coef > 0:
        import copy

        reference = copy.deepcopy(policy).eval().requires_grad_(False)

    # ---- optimiser, schedule, data stream
    trainable = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapter only
    opt = build_optimizer(trainable, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                          weight_decay=cfg.optimizer.weight_decay)  # fp32 master weights for bf16 parameters
    total_updates = max(1, cfg.steps * cfg.algorithm.ppo_epochs * cfg.algorithm.num_minibatches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optimizer.schedule, cfg.optimizer.warmup_steps,
                                                             total_updates))
    stream = QuestionStream(train_samples, seed=cfg.data.seed)
    start_step = 0
    if resume_dir is not None:
        state = resume_state
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        restore_rng_state(state["rng"], getattr(engine, "generator", None))
        start_step = int(state["step"])
        print(f"[openrlhf-search] resumed from {resume_dir} at step {start_step}")

    logger = MetricsLogger(out, cfg.logging.tensorboard, cfg.logging.wandb_project,
                           resume_step=start_step if resume_dir is not None else None, run_config=config_to_dict(cfg))
    progress = Progress(cfg.steps, initial=start_step, enabled=cfg.logging.progress, time_budget=cfg.max_step_seconds)
    samples_dir = out / "samples"
    samples_dir.mkdir(exist_ok=True)

    saves = {"t": time.perf_counter()}
    run_config_text = (out / "config.yaml").read_text(encoding="utf-8")
    if resume_dir is not None:
        guard.saved = (resume_dir, start_step)

    producer = None  # the asynchronous rollout producer (rollout.async_producer), started below

    def data_snapshot() -> dict:
        """Data position and RNG: with the asynchronous producer its open groups' questions are requeued."""
        if producer is not None:
            return {"data": producer.data_state(), "rng": producer.engine_rng_state(capture_rng_state)}
        return {"data": stream.state_dict(), "rng": capture_rng_state(getattr(engine, "generator", None))}

    def checkpoint(step: int, snapshot: dict | None = None) -> Path:
        """Save the state after ``step``; ``snapshot`` (data position, RNG) when taken at the start of step+1."""
        if guard.saved is not None and guard.saved[1] == step:
            return guard.saved[0]  # already saved (a periodic save right before the final or a preemption save)
        snapshot = snapshot or data_snapshot()
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **snapshot}
        path = save_checkpoint(out / "checkpoints", step, policy, tokenizer, state, keep=cfg.logging.keep_checkpoints,
                               extra_files={"run_config.yaml": run_config_text})
        guard.saved, saves["t"] = (path, step), time.perf_counter()
        return path

    skips = SkipMonitor(cfg.optimizer.max_skipped_steps)
    summary["setup_seconds"] = time.perf_counter() - t_setup
    t_rl = time.perf_counter()
    step = start_step
    if cfg.rollout.max_staleness < 0:
        raise ValueError(f"rollout.max_staleness={cfg.rollout.max_staleness}: expected >= 0 (0 = synchronous)")
    if cfg.rollout.max_staleness > 0 and resume_dir is not None and not cfg.rollout.async_producer:
        raise ValueError(f"rollout.max_staleness={cfg.rollout.max_staleness} cannot --resume: the queue of stale "
                         "batches is not checkpointed (start a new run or resume with rollout.max_staleness=0)")
    stale_queue: collections.deque = collections.deque()  # (policy version that sampled it, batch)
    policy_version = start_step
    eval_engine, eval_env = engine, env
    if cfg.rollout.async_producer:
        producer, eval_engine, eval_env = start_producer(cfg, policy, engine, tokenizer, retriever, stream,
                                                         reward_fn, preset, sample_params, timer, start_step)
    guard.deferred = True  # from here on SIGTERM/SIGINT checkpoint at the end of the step
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            guard.phase = f"RL step {step}"
            t_step = time.perf_counter()
            # the state a checkpoint of step - 1 holds (saved if this step cannot complete: retriever outage)
            snapshot = data_snapshot()
            timer.reset()
            retrieval_calls = retriever.calls
            metrics: dict[str, float] = {}

            # 1-3. rollout, reward, DSPO/DAPO filtering (resampling until the batch is full, capped); with
            # rollout.max_staleness = k the batch trained on was sampled k versions ago (queued; k = 0: this step's)
            try:
                if producer is not None:  # asynchronous: the producer thread has been sampling all along
                    stale_queue.append((None, producer.next_batch()[0]))
                while producer is None and len(stale_queue) < cfg.rollout.max_staleness + 1:
                    stale_queue.append((policy_version, collect_groups(
                        engine, env, stream.take, lambda tr: score_trajectories(tr, reward_fn, tokenizer),
                        target_groups=cfg.rollout.prompts_per_step, group_size=cfg.rollout.group_size,
                        params=sample_params, dynamic_filtering=preset.dynamic_filter,
                        max_rounds=cfg.rollout.max_filter_rounds, timer=timer)))
            except Exception as exc:
                if _is_retrieval_failure(exc):
                    saved = checkpoint(step - 1, snapshot)
                    raise RetrieverDownError(f"step {step}: the retriever failed: {exc} (state after step {step - 1} "
                                             f"saved in {saved}; rerun with --resume)") from exc
                raise
            batch_version, batch = stale_queue.popleft()
            if cfg.rollout.max_staleness > 0 and producer is None:
                metrics["rollout/staleness"] = float(policy_version - batch_version)
            metrics.update(batch.metrics)
            metrics["reward_mean"] = batch.metrics.get("reward_all_mean", _mean(batch.rewards))
            metrics["samples"] = batch.samples_used
            trajs = batch.trajectories

            t_update = time.perf_counter()
            if trajs:
                metrics.update(trajectory_stats(trajs))
                calls = retriever.calls - retrieval_calls
                metrics.update(retrieval_metrics(trajs, timer.seconds.get("retrieval", 0.0), calls))
                # 4. advantages: group-relative per sequence, then (CalibAdv) per token
                rewards = torch.tensor(batch.rewards, dtype=torch.float32)
                group_ids = torch.tensor(batch.group_ids)
                seq_adv = estimator(rewards, group_ids)
                packed = pack(trajs, tokenizer.pad_token_id, device)
                packed.version = policy_version
                advantages = seq_adv.to(device)
                if adv_chain:  # advantage post-processors (CalibAdv, plugins), the chain the OpenRLHF patch runs too
                    records = [t.to_calib_record() for t in trajs] if needs_records(adv_chain) else None
                    advantages, cal_metrics = apply_postprocessors(adv_chain, seq_adv, packed.action_mask.cpu(),
                                                                   group_ids, records)
                    advantages = advantages.to(device)
                    metrics.update(cal_metrics)
                metrics["adv_abs_mean"] = float(seq_adv.abs().mean())

                # 5. old (and reference) log-probs, recomputed by the trainer
                all_rows = torch.arange(len(trajs))
                with torch.no_grad():
                    policy.eval()
                    old_lp = torch.cat([response_logprobs(policy, packed, r, cfg.rollout.temperature)
                                        for r in all_rows.split(16)])
                    ref_lp = None
                    if reference is not None:
                        ref_lp = torch.cat([response_logprobs(reference, packed, r, cfg.rollout.temperature)
                                            for r in all_rows.split(16)])
                m = packed.action_mask
                metrics["rollout/engine_logprob_gap"] = float(((old_lp - packed.engine_logprobs).abs() * m).sum()
                                                              / m.sum().clamp(min=1))

                # 6. minibatch updates
                policy.train()
                upd = update_policy(policy, opt, sched, loss_fn, packed, old_lp, ref_lp, advantages, cfg)
                policy.eval()
                if producer is not None:
                    producer.publish(policy)  # the engine takes the weights at its next turn boundary
                else:
                    engine.update_weights(policy)
                policy_version += 1
                metrics.update(upd)
                skips.update(step, math.isnan(upd.get("update/grad_norm", float("nan"))),
                             str(guard.saved[0]) if guard.saved else None)
                if cfg.logging.rollout_every and (step % cfg.logging.rollout_every == 0 or step == start_step + 1):
                    write_rollout_records(out, step, batch, packed, advantages, old_lp, policy, tokenizer, cfg)
            else:
                metrics["update/skipped_empty_batch"] = 1.0
                if producer is not None:  # the version still advances: the bound counts batches, not updates
                    producer.publish(None)
                    policy_version += 1
            t_end = time.perf_counter()

            # 7. timing, logging, samples, checkpoints
            phases = timer.reset()
            total = t_end - t_step
            metrics["time/generation"] = phases.get("generation", 0.0)
            metrics["time/retrieval"] = phases.get("retrieval", 0.0)
            metrics["time/env"] = max(0.0, phases.get("env", 0.0) - metrics["time/retrieval"])
            metrics["time/update"] = t_end - t_update
            metrics["time/other"] = max(0.0, total - metrics["time/generation"] - metrics["time/retrieval"]
                                        - metrics["time/env"] - metrics["time/update"])
            metrics["time/step"] = total
            if producer is not None:
                metrics["async/learner_idle_share"] = metrics["async/learner_idle_s"] / total if total > 0 else 0.0
            metrics["lr"] = sched.get_last_lr()[0]
            if cfg.logging.eval_every and step % cfg.logging.eval_every == 0 and step < cfg.steps:
                ev = evaluate_policy(eval_engine, eval_env, eval_samples, tokenizer, eval_params)
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
            logger.log(step, metrics, histograms={"rollout/staleness": producer.last_group_staleness}
                       if producer is not None else None)
            if trajs and cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or step == start_step + 1):
                best = max(range(len(trajs)), key=lambda i: batch.rewards[i])
                (samples_dir / f"step_{step:06d}.txt").write_text(
                    render_trajectory(trajs[best], tokenizer, batch.rewards[best]) + "\n\n---\n\n"
                    + render_trajectory(trajs[0], tokenizer, batch.rewards[0]) + "\n")
            if producer is None:
                progress.update(reward=metrics["reward_mean"], step_s=total)
            else:  # asynchronous: how stale the batch was and who waited for whom
                progress.update(reward=metrics["reward_mean"], step_s=total,
                                stale=metrics.get("rollout/staleness_mean", 0.0),
                                idle=f"L{100 * metrics['async/learner_idle_share']:.0f}%/"
                                     f"R{100 * metrics['async/rollout_idle_share']:.0f}%")
            if cfg.logging.save_every and step % cfg.logging.save_every == 0:
                checkpoint(step)
            elif cfg.logging.save_every_seconds and time.perf_counter() - saves["t"] >= cfg.logging.save_every_seconds:
                checkpoint(step)
            if guard.requested:
                progress.close()
                logger.close()
                raise Preempted(guard.requested, checkpoint(step), step)
            if cfg.max_step_seconds and time.perf_counter() - t_rl > cfg.max_step_seconds:
                print(f"\n[openrlhf-search] RL time budget max_step_seconds={cfg.max_step_seconds} reached at step "
                      f"{step}")
                break
    finally:
        if producer is not None:
            producer.close()
            engine.update_weights(policy)  # the final evaluation samples from the trained weights
    progress.close()
    summary["steps_done"] = step
    summary["rl_seconds"] = time.perf_counter() - t_rl

    # ---- final checkpoint, held-out evaluation, plot
    final_dir = checkpoint(step)
    guard.deferred = False  # a signal during the final evaluation stops at once (the checkpoint is written)
    guard.phase = "the final evaluation"
    if guard.requested:
        raise Preempted(guard.requested, final_dir, step)
    summary["checkpoint"] = str(final_dir)
    summary["eval_after"] = evaluate_policy(engine, env, eval_samples, tokenizer, eval_params,
                                            rollouts_path=out / "eval_after_rollouts.jsonl")
    if eval_samples:
        from openrlhf_search.rollout.runner import run_rollouts

        final = run_rollouts(engine, env, eval_samples[:1], 1, eval_params)[0]
        summary["final_sample"] = render_trajectory(final, tokenizer, score_trajectories([final], reward_fn,
                                                                                         tokenizer)[0][0])
    logger.close()
    plot = plot_reward_curve(out / "metrics.jsonl", out / "reward_curve.png", title=f"{cfg.algorithm.name} reward")
    summary.update(metrics_path=str(out / "metrics.jsonl"), plot=str(plot), samples_dir=str(samples_dir))
    summary.update(reward_window_stats(out / "metrics.jsonl"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def start_producer(cfg: TrainConfig, policy, engine, tokenizer, retriever, stream, reward_fn, preset, params, timer,
                   start_version: int):
    """Start the asynchronous rollout producer (``rollout.async_producer``).

    Returns ``(producer, eval_engine, eval_env)``: the engine belongs to the producer thread until it is closed, so
    mid-run evaluation (``logging.eval_every``) samples from the learner's policy through its own HF engine and
    environment (greedy by default, so the figures do not depend on the engine).
    """
    import copy

    from openrlhf_search.rollout.hf import HFEngine
    from openrlhf_search.rollout.producer import AsyncProducer

    shadow = copy.deepcopy(policy).eval().requires_grad_(False)  # the engine's own weights
    producer = AsyncProducer(
        engine, shadow, build_env(cfg, tokenizer, retriever), stream,
        lambda tr: score_trajectories(tr, reward_fn, tokenizer), batch_size=cfg.rollout.prompts_per_step,
        group_size=cfg.rollout.group_size, params=params, max_staleness=cfg.rollout.max_staleness,
        partial_rollouts=cfg.rollout.partial_rollouts, dynamic_filtering=preset.dynamic_filter,
        max_filter_rounds=cfg.rollout.max_filter_rounds, start_version=start_version, timer=timer)
    return producer, HFEngine(policy, tokenizer, seed=cfg.seed + 1), build_env(cfg, tokenizer, retriever)


# ============================================================================================ front-end glue
def run_mode(args) -> str:
    """The run-directory mode (:mod:`~openrlhf_search.trainer.rundir`) of the CLI flags."""
    if getattr(args, "resume", False):
        return "resume"
    if getattr(args, "resume_or_start", False):
        return "resume_or_start"
    return "overwrite" if getattr(args, "overwrite", False) else "fresh"


def train_or_exit_code(cfg: TrainConfig, mode: str, prog: str):
    """:func:`train`, or the exit code of a failure that is the input's or the cluster's, not a bug (one line on
    stderr; see :mod:`~openrlhf_search.trainer.preemption` for the codes)."""
    import sys

    from openrlhf_search.data.formats import DatasetFormatError
    from openrlhf_search.trainer.checkpoint import CheckpointError
    from openrlhf_search.trainer.preemption import (
        EXIT_DIVERGED,
        EXIT_PREEMPTED,
        EXIT_RETRIEVER,
        EXIT_USAGE,
        Diverged,
        Preempted,
    )
    from openrlhf_search.trainer.rundir import RunDirError

    try:
        return train(cfg, mode=mode)
    except Preempted as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except (RunDirError, DatasetFormatError, CheckpointError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Diverged as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception as exc:  # a retriever that is down fails the run with one clear line, not a traceback
        if isinstance(exc, RetrieverDownError) or _is_retrieval_failure(exc):
            print(f"{prog}: retriever {cfg.retriever.spec or '(built-in BM25)'} failed: {exc}", file=sys.stderr)
            return EXIT_RETRIEVER
        raise


# ============================================================================================ loop pieces
def replace_params(params, **kw):
    from dataclasses import replace

    return replace(params, **kw)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak LR at optimiser step ``s``: linear warm-up then ``constant``/``linear``/``cosine``."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"optimizer.schedule={schedule!r}: expected constant, linear or cosine")

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - frac
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return f


def update_policy(policy, opt, sched, loss_fn, packed: PackedBatch, old_lp, ref_lp, advantages, cfg) -> dict:
    """``ppo_epochs`` x ``num_minibatches`` optimiser steps; NaN/inf loss or gradients skip the step (logged).

    Each minibatch runs as ``cfg.algorithm.micro_batches`` gradient-accumulation micro-batches, each loss divided
    by the minibatch's normaliser (``algorithms.step_normalizers``) and the losses summed: the gradient is the
    minibatch objective's for any number of micro-batches (the same contract as the OpenRLHF and Megatron backends).
    """
    import torch

    from openrlhf_search.algorithms.losses import ADDITIVE_METRICS, PolicyLoss, step_normalizers

    B = packed.input_ids.size(0)
    n_mb = max(1, min(cfg.algorithm.num_minibatches, B))
    agg: dict[str, list[float]] = {}
    skipped = 0
    grad_norms = []
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    for _ in range(cfg.algorithm.ppo_epochs):
        perm = torch.randperm(B, generator=gen)
        for rows in perm.chunk(n_mb):
            micro = rows.chunk(max(1, min(cfg.algorithm.micro_batches, len(rows))))
            # the loss says which step counts it divides by (PolicyLoss.normalizers); a bare callable: local means
            norms = (step_normalizers([(packed.action_mask[r], advantages[r]) for r in micro], loss_fn)
                     if isinstance(loss_fn, PolicyLoss) else {})  # fmt: skip
            opt.zero_grad(set_to_none=True)
            step: dict[str, float] = {}
            finite = True
            for r in micro:
                lp = response_logprobs(policy, packed, r, cfg.rollout.temperature)
                extra = {"ref_log_probs": ref_lp[r]} if ref_lp is not None else {}
                if getattr(loss_fn, "needs_behaviour_log_probs", False):  # +tis / +mis: the engine's own log-probs
                    extra["behaviour_log_probs"] = packed.engine_logprobs[r]
                    if packed.token_versions is not None and packed.version is not None:  # staleness diagnostics
                        extra.update(token_versions=packed.token_versions[r], current_version=packed.version)
                loss, m = loss_fn(lp, old_lp[r], advantages[r], packed.action_mask[r], **extra, **norms)
                if not norms:  # no normaliser: each call is a local mean, average them
                    loss = loss / len(micro)
                for k, v in m.items():  # shares of the step's value add up; local means are averaged
                    share = norms and k in ADDITIVE_METRICS
                    step[k] = step.get(k, 0.0) + float(v) * (1.0 if share else len(r) / len(rows))
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
            for k, v in step.items():
                agg.setdefault(k, []).append(v)
            if not finite:
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else float("inf")
            gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
            if not torch.isfinite(gnorm):
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            grad_norms.append(float(gnorm))
            opt.step()
            sched.step()
    out = {f"loss/{k}" if "/" not in k else k: sum(v) / len(v) for k, v in agg.items() if v}
    out["update/skipped_nonfinite"] = float(skipped)
    out["update/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    return out


def write_rollout_records(out: Path, step: int, batch, packed: PackedBatch, advantages, old_lp, policy, tokenizer,
                          cfg) -> Path:
    """Every trajectory of the step as a viewer record (``rollouts/step_N.jsonl``; see :mod:`openrlhf_search.viewer`).

    The ratio shown is ``pi_theta / pi_old`` after this step's update (one extra forward pass, only on logged steps):
    the drift the next epoch, or the next step off-policy, would see; tokens below SAPO's threshold are marked.
    """
    import torch

    from openrlhf_search.viewer.records import ROLLOUTS_DIR, trajectory_record, write_records

    with torch.no_grad():
        rows = torch.arange(len(batch.trajectories))
        new_lp = torch.cat([response_logprobs(policy, packed, r, cfg.rollout.temperature) for r in rows.split(16)])
    ratio = torch.exp((new_lp - old_lp).clamp(-20, 20)).cpu()
    adv = advantages.detach().float().cpu()
    if adv.dim() == 1:
        adv = adv[:, None].expand(-1, ratio.size(1))
    records = []
    for i, t in enumerate(batch.trajectories):
        n = len(t.response_ids)
        records.append(trajectory_record(
            t, tokenizer, step=step, reward=batch.rewards[i], reward_info=batch.reward_infos[i],
            advantages=adv[i, :n].tolist(), ratios=ratio[i, :n].tolist()))
    return write_records(out / ROLLOUTS_DIR / f"step_{step:06d}.jsonl", records)


def trajectory_stats(trajs) -> dict[str, float]:
    """Turns, searches, response length (model tokens / all tokens), finish reasons."""
    n = len(trajs)
    stats = {
        "turns_per_traj": sum(len(t.turns) for t in trajs) / n,
        "searches_per_traj": sum(t.num_searches for t in trajs) / n,
        "response_len": sum(len(t.response_ids) for t in trajs) / n,
        "model_tokens": sum(sum(t.action_mask) for t in trajs) / n,
        "answered_frac": sum(1 for t in trajs if t.answer is not None) / n,
    }
    return stats


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _is_retrieval_failure(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"RetrieverUnavailable", "RetrieverRequestError", "ConnectError", "ConnectionError",
                         "ConnectionRefusedError"})


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def reward_window_stats(metrics_path: Path, window: int = 10) -> dict[str, float]:
    """Mean ``reward_mean`` of the first and last ``window`` steps, and their difference."""
    from openrlhf_search.trainer.logging import read_metrics

    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("reward_mean"), (int, float))]
    if not rows:
        return {}
    w = min(window, max(1, len(rows) // 2))
    first = sum(r["reward_mean"] for r in rows[:w]) / w
    last = sum(r["reward_mean"] for r in rows[-w:]) / w
    return {"reward_first_window": first, "reward_last_window": last, "reward_gain": last - first, "window": w}


def warm_start(cfg: TrainConfig, policy, tokenizer, env, kb, retriever, worlds: list | None = None) -> dict:
    """SFT on imperfect synthetic demonstrations (prompt ids from the environment itself).

    Demonstrations answer ``kb``'s train questions through ``retriever``, or, given ``worlds``
    (:func:`build_demo_worlds`), the train questions of those fresh worlds with their supporting passage observed.
    """
    from openrlhf_search.data.synthetic import synthetic_trajectories
    from openrlhf_search.env.templates import get_template
    from openrlhf_search.trainer.logging import Progress
    from openrlhf_search.trainer.sft import copy_examples, run_sft, tokenize_demonstration

    if kb is None:
        raise ValueError("sft.steps > 0 needs data.source=synthetic (demonstrations come from the synthetic KB)")
    t0 = time.perf_counter()
    result: dict = {}
    if cfg.sft.copy_steps > 0:  # phase 0: the dense copy objective on the corpus' names and numbers
        words = sorted({w.strip(".,") for d in kb.corpus for w in d.contents.replace('"', " ").split()
                        if w[:1].isupper() or w[:1].isdigit()})
        copies = copy_examples(words, tokenizer, cfg.sft.copy_steps * cfg.sft.copy_batch_size, seed=cfg.seed)

        bar = Progress(cfg.sft.copy_steps, enabled=cfg.logging.progress, desc="warm start: copy")
        closs = run_sft(policy, copies, cfg.sft.copy_steps, cfg.sft.copy_batch_size, cfg.sft.lr,
                        tokenizer.pad_token_id, seed=cfg.seed, log=lambda step, loss: bar.update(loss=loss))
        bar.close()
        result.update(copy_loss_first=closs[0], copy_loss_last=closs[-1],
                      copy_seconds=time.perf_counter() - t0)
    common = dict(mistake_rate=cfg.sft.mistake_rate, no_search_share=cfg.sft.no_search_share,
                  topk=cfg.env.topk, template=get_template(cfg.env.template))
    if worlds:
        demos = [d for i, w in enumerate(worlds) for d in synthetic_trajectories(w, "train", seed=cfg.data.seed + i,
                                                                                 **common)]
        random.Random(cfg.seed).shuffle(demos)
        if len(demos) < cfg.sft.num_demos:
            print(f"[sft] {len(worlds)} demonstration worlds hold {len(demos)} questions < sft.num_demos="
                  f"{cfg.sft.num_demos}; cycling through them", flush=True)
        demos = [demos[i % len(demos)] for i in range(cfg.sft.num_demos)]
    else:
        demos = synthetic_trajectories(kb, "train", n=cfg.sft.num_demos, seed=cfg.data.seed + 1, retriever=retriever,
                                       **common)
    prompts = env.reset([d.sample for d in demos])
    examples = [tokenize_demonstration(list(p.prompt_ids), d.segments, tokenizer) for p, d in zip(prompts, demos)]
    bar = Progress(cfg.sft.steps, enabled=cfg.logging.progress, desc="warm start: SFT")
    losses = run_sft(policy, examples, cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr, tokenizer.pad_token_id,
                     seed=cfg.seed, log=lambda step, loss: bar.update(loss=loss))
    bar.close()
    result.update(steps=cfg.sft.steps, loss_first=losses[0] if losses else None,
                  loss_last=losses[-1] if losses else None,
                  demo_accuracy=sum(d.correct for d in demos) / len(demos), seconds=time.perf_counter() - t0)
    return result
