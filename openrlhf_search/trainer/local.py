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
        7. log / sample / checkpoint; warn when no step has a learning signal (trainer.diagnosis)

Steps 1-3 come from a :class:`~openrlhf_search.trainer.sources.BatchSource` chosen once by :func:`build_source`
(synchronous, a stale queue, or the asynchronous producer); steps 4-6 are :class:`Learner`'s; saving is
:class:`Checkpointer`'s. Retrieval failures are the typed errors of :mod:`openrlhf_search.retrieval.errors`.

Old log-probs. The importance ratios use log-probs recomputed by the trainer with the same weights, the same
temperature and the same padding as the update's forward pass, not the engine's: engine and trainer numerics differ
(KV cache vs full forward, vLLM kernels, bf16), and mixing them biases the ratio away from 1 at the first
minibatch. The engine's log-probs are kept as a diagnostic (``rollout/engine_logprob_gap``, mean absolute
difference on model tokens), which also catches a rollout engine that stopped receiving weight updates.

The tiny quickstart model shares its weights with the HF engine (no copy); vLLM engines receive the weights through
``update_weights`` after each optimizer step.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from openrlhf_search.algorithms.advantages import get_advantage_estimator
from openrlhf_search.algorithms.logprobs import sampled_token_logprobs
from openrlhf_search.algorithms.losses import ADDITIVE_METRICS, PolicyLoss, step_normalizers
from openrlhf_search.algorithms.postprocess import apply_postprocessors, needs_records
from openrlhf_search.algorithms.presets import advantage_pipeline, preset_for
from openrlhf_search.data.formats import DatasetFormatError
from openrlhf_search.data.synthetic import fresh_worlds, generate_kb, synthetic_trajectories, write_kb
from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
from openrlhf_search.env.scoring import score_trajectories as score_batch
from openrlhf_search.env.search_env import SearchEnv
from openrlhf_search.env.templates import get_template
from openrlhf_search.plugins import load_plugins
from openrlhf_search.retrieval import load_retriever
from openrlhf_search.retrieval.bm25 import BM25Config, BM25Index, BM25Retriever
from openrlhf_search.retrieval.cache import with_cache
from openrlhf_search.retrieval.errors import RetrievalError, is_retrieval_failure
from openrlhf_search.retrieval.metrics import replica_metrics, replica_stats, retrieval_metrics
from openrlhf_search.rewards import get_reward_fn
from openrlhf_search.rollout.base import SamplingParams
from openrlhf_search.rollout.hf import HFEngine
from openrlhf_search.rollout.producer import AsyncProducer
from openrlhf_search.rollout.runner import PhaseTimer, RolloutBatch, TimedRetriever, run_rollouts
from openrlhf_search.rollout.vllm import VLLMEngine
from openrlhf_search.trainer import lora
from openrlhf_search.trainer.checkpoint import (
    CheckpointError,
    checkpoint_candidates,
    find_resume_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from openrlhf_search.trainer.config import TrainConfig, config_to_dict, save_config, search_env_config
from openrlhf_search.trainer.data import QuestionStream, read_question_files
from openrlhf_search.trainer.diagnosis import SignalMonitor
from openrlhf_search.trainer.evaluate import score_rollouts
from openrlhf_search.trainer.logging import MetricsLogger, Progress, plot_reward_curve, read_metrics, render_trajectory
from openrlhf_search.trainer.memory import memory_metrics, release_freed_memory
from openrlhf_search.trainer.models import (
    TinyModelSpec,
    build_optimizer,
    build_tiny_qwen2,
    load_pretrained,
    load_tokenizer,
)
from openrlhf_search.trainer.preemption import (
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_RETRIEVER,
    EXIT_USAGE,
    Diverged,
    Preempted,
    PreemptionGuard,
    SkipMonitor,
)
from openrlhf_search.trainer.rundir import RunDirError, prepare_run_dir
from openrlhf_search.trainer.sft import (
    copy_examples,
    retrieved_demonstrations,
    run_sft,
    select_train_questions,
    tokenize_demonstration,
)
from openrlhf_search.trainer.sources import AsyncSource, BatchSource, StaleQueueSource, SyncSource
from openrlhf_search.viewer.records import ROLLOUTS_DIR, trajectory_record, write_records


class RetrieverDownError(RetrievalError):
    """The retriever failed (after the client's own retries); the step cannot continue."""


# ============================================================================================ setup helpers
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str, env: dict | None = None):
    """``auto``: CUDA when available, else the CPU -- said loudly inside a Slurm job (``SLURM_JOB_ID``), where a CPU
    fallback almost always means the job did not request a GPU (``--gpus``/``--gres=gpu:1``) on a cluster that
    enforces allocations, and the run would silently take hours instead of minutes."""
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
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_questions(cfg: TrainConfig, out: Path):
    """``(train, eval, kb)``: the synthetic KB's splits (written to ``<out>/data``) or the configured files."""
    if cfg.data.source == "synthetic":
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


def build_demo_worlds(cfg: TrainConfig, kb) -> list:
    """The fresh synthetic worlds of the warm start's demonstrations (``sft.demo_worlds``; [] when 0)."""
    if cfg.sft.demo_worlds <= 0 or cfg.model.path != "tiny" or (cfg.sft.steps <= 0 and cfg.sft.copy_steps <= 0):
        return []
    if kb is None:
        raise ValueError("sft.demo_worlds > 0 needs data.source=synthetic")

    return fresh_worlds(kb, cfg.sft.demo_worlds, cfg.data.num_entities, cfg.data.two_hop_fraction,
                        seed=cfg.data.seed + 1000)


def build_retriever(cfg: TrainConfig, out: Path, kb):
    """The configured retriever, or a BM25 index over the synthetic corpus built into ``<out>/index`` (loaded when it
    is there already: ``kb`` may then be None, as for ``openrlhf-search eval`` of a run)."""
    rc = cfg.retriever
    if rc.spec or rc.cache_mode == "replay":
        http = rc.spec.startswith(("http://", "https://"))
        return load_retriever(rc.spec or None, token=rc.token, cache=rc.cache or None, cache_mode=rc.cache_mode,
                              **({"timeout": rc.timeout} if http else {}))
    index_dir = out / "index"
    if kb is None and not (index_dir / "manifest.json").exists():  # eval of a run reuses the run's own index
        raise ValueError("retriever.spec is empty and data.source is not synthetic: give an index dir or URL")
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
        if is_retrieval_failure(exc):
            raise RetrieverDownError(f"retriever {spec or '(built-in BM25)'} is not answering: {exc}") from exc
        raise


def build_tokenizer_and_model(cfg: TrainConfig, out: Path, kb, train_samples, device, resume_dir: Path | None,
                              worlds: list | None = None):
    """Tokenizer + policy: from the resume checkpoint, a pretrained path, or the tiny random-init Qwen2.

    The tiny tokenizer is trained on the KB's passages plus the questions of the demonstration ``worlds`` when there
    are any (else the training questions, which repeat each training name ~10 times and so give many of them a
    token of their own: a model that learned to copy multi-token names then fails on exactly those).
    """
    dtype = resolve_dtype(cfg.model.dtype, device)
    if resume_dir is not None:
        tok = load_tokenizer(resume_dir)  # exactly the run's tokenizer (AutoTokenizer would rebuild the tiny one)
        model = AutoModelForCausalLM.from_pretrained(str(resume_dir), dtype=dtype)
    elif cfg.model.path == "tiny":
        texts = [d.contents for d in kb.corpus] if kb is not None else []
        questions = [s.question for w in worlds for s in w.train] if worlds else [s.question for s in train_samples]
        texts += [d.contents for w in worlds or () for d in w.corpus] + questions

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
    return SearchEnv(tokenizer, retriever, cfg.env.template, search_env_config(cfg))


def build_engine(cfg: TrainConfig, policy, tokenizer, out: Path):
    if cfg.rollout.engine == "hf":
        return HFEngine(policy, tokenizer, seed=cfg.seed)
    if cfg.rollout.engine == "vllm":
        path = out / "rollout_weights"
        policy.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
        return VLLMEngine(str(path), seed=cfg.seed, dtype=str(next(policy.parameters()).dtype).replace("torch.", ""))
    raise ValueError(f"rollout.engine={cfg.rollout.engine!r}: expected 'hf' or 'vllm'")


# ============================================================================================ scoring / tensors
def score_trajectories(trajs, reward_fn, tokenizer) -> tuple[list[float], list[dict]]:
    """Reward of each trajectory: one batched call of the reward every backend makes
    (``env.scoring.score_trajectories``: the answer the environment accepted, its one format check)."""
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
    model = lora.base_model(model)  # a LoRA policy: the transformers model inside peft's wrapper (adapters injected)
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
    del tokenizer
    if not samples:
        return {}
    trajs = run_rollouts(engine, env, samples, 1, params)
    if rollouts_path is not None:
        with open(rollouts_path, "w", encoding="utf-8") as fh:
            for t in trajs:
                fh.write(json.dumps(t.to_dict(), default=str) + "\n")
    return score_rollouts(trajs)


# ============================================================================================ the learner
@dataclass
class StepResult:
    """What one update produced: the step's metrics and the tensors its rollout records show."""

    metrics: dict[str, float]
    packed: PackedBatch
    advantages: Any
    old_lp: Any


class Learner:
    """Steps 4-6 of the loop on one batch: advantages, the trainer's old (and reference) log-probs, the minibatch
    updates. Owns the loss, the advantage pipeline, the optimiser and its schedule (resolved from the algorithm
    preset exactly as every backend resolves them)."""

    def __init__(self, cfg: TrainConfig, policy, tokenizer, device, preset):
        self.cfg, self.policy, self.tokenizer, self.device = cfg, policy, tokenizer, device
        loss_cfg = dict(cfg.algorithm.loss_overrides)
        if cfg.algorithm.kl_coef > 0:
            loss_cfg.update(kl_coef=cfg.algorithm.kl_coef, kl_estimator=cfg.algorithm.kl_estimator)
        self.loss_fn = preset.build_loss(**loss_cfg)
        estimator_name, estimator_cfg, self.adv_chain = advantage_pipeline(preset, cfg.algorithm)
        self.estimator = get_advantage_estimator(estimator_name, **estimator_cfg)
        self.reference = None
        if cfg.algorithm.kl_coef > 0:
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        trainable = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapter only
        self.opt = build_optimizer(trainable, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                                   weight_decay=cfg.optimizer.weight_decay)  # fp32 master weights for bf16 parameters
        total_updates = max(1, cfg.steps * cfg.algorithm.ppo_epochs * cfg.algorithm.num_minibatches)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.optimizer.schedule, cfg.optimizer.warmup_steps, total_updates))

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def _logprobs(self, model, packed: PackedBatch, n: int):
        rows = torch.arange(n)
        return torch.cat([response_logprobs(model, packed, r, self.cfg.rollout.temperature) for r in rows.split(16)])

    def learn(self, batch: RolloutBatch, version: int) -> StepResult:
        """Update the policy on ``batch`` (non-empty); ``version`` is the learner's version the rows train at."""
        cfg, trajs = self.cfg, batch.trajectories
        metrics: dict[str, float] = {}
        # 4. advantages: group-relative per sequence, then (CalibAdv, plugins) per token
        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        group_ids = torch.tensor(batch.group_ids)
        seq_adv = self.estimator(rewards, group_ids)
        packed = pack(trajs, self.tokenizer.pad_token_id, self.device)
        packed.version = version
        advantages = seq_adv.to(self.device)
        if self.adv_chain:  # the post-processor chain the OpenRLHF patch runs too
            records = [t.to_calib_record() for t in trajs] if needs_records(self.adv_chain) else None
            advantages, cal_metrics = apply_postprocessors(self.adv_chain, seq_adv, packed.action_mask.cpu(),
                                                           group_ids, records)
            advantages = advantages.to(self.device)
            metrics.update(cal_metrics)
        metrics["adv_abs_mean"] = float(seq_adv.abs().mean())

        # 5. old (and reference) log-probs, recomputed by the trainer
        with torch.no_grad():
            self.policy.eval()
            old_lp = self._logprobs(self.policy, packed, len(trajs))
            ref_lp = self._logprobs(self.reference, packed, len(trajs)) if self.reference is not None else None
        m = packed.action_mask
        metrics["rollout/engine_logprob_gap"] = float(((old_lp - packed.engine_logprobs).abs() * m).sum()
                                                      / m.sum().clamp(min=1))

        # 6. minibatch updates
        self.policy.train()
        metrics.update(update_policy(self.policy, self.opt, self.sched, self.loss_fn, packed, old_lp, ref_lp,
                                     advantages, cfg))
        self.policy.eval()
        return StepResult(metrics, packed, advantages, old_lp)


# ============================================================================================ checkpoints
class Checkpointer:
    """Saves the run's state after a step (weights, tokenizer, optimiser, data position, RNG) and remembers the
    last save in ``guard.saved``, which a preemption reads.

    ``snapshot`` (the source's data position and RNG) defaults to the source's state now, i.e. after ``step``.
    """

    def __init__(self, out: Path, cfg: TrainConfig, policy, tokenizer, learner: Learner, source: BatchSource,
                 guard):
        self.dir, self.cfg, self.policy, self.tokenizer = out / "checkpoints", cfg, policy, tokenizer
        self.learner, self.source, self.guard = learner, source, guard
        self.run_config_text = (out / "config.yaml").read_text(encoding="utf-8")
        self.last_save = time.perf_counter()

    def save(self, step: int, snapshot: dict | None = None) -> Path:
        if self.guard.saved is not None and self.guard.saved[1] == step:
            return self.guard.saved[0]  # already saved (a periodic save right before the final or a preemption save)
        state = {"step": step, **self.learner.state_dict(), **(snapshot or self.source.snapshot())}
        path = save_checkpoint(self.dir, step, self.policy, self.tokenizer, state,
                               keep=self.cfg.logging.keep_checkpoints,
                               extra_files={"run_config.yaml": self.run_config_text})
        self.guard.saved, self.last_save = (path, step), time.perf_counter()
        return path

    def due(self, step: int) -> bool:
        """``logging.save_every`` steps or ``logging.save_every_seconds`` since the last save."""
        lg = self.cfg.logging
        return bool((lg.save_every and step % lg.save_every == 0)
                    or (lg.save_every_seconds and time.perf_counter() - self.last_save >= lg.save_every_seconds))


# ============================================================================================ the loop
def train(cfg: TrainConfig, resume: bool = False, mode: str | None = None) -> dict:
    """Run (or resume) a local RL run; returns a summary dict (also written to ``<output_dir>/summary.json``).

    ``mode`` (:mod:`~openrlhf_search.trainer.rundir`): ``fresh`` (default; refuses a non-empty run directory),
    ``resume`` (the default when ``resume=True``), ``resume_or_start`` or ``overwrite``. SIGTERM/SIGINT checkpoint
    at the end of the current step and raise :class:`~openrlhf_search.trainer.preemption.Preempted`.
    """
    with PreemptionGuard() as guard:
        return _train(cfg, mode or ("resume" if resume else "fresh"), guard)


def _train(cfg: TrainConfig, mode: str, guard) -> dict:
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
    check_staleness(cfg, resume_dir is not None)
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
    train_samples = select_train_questions(cfg.data, env, train_samples)
    engine = build_engine(cfg, policy, tokenizer, out)
    reward_fn = get_reward_fn(cfg.env.reward, **cfg.env.reward_kwargs)
    sample_params = SamplingParams(max_new_tokens=cfg.env.max_tokens_per_turn, temperature=cfg.rollout.temperature,
                                   top_p=cfg.rollout.top_p)
    eval_params = replace_params(sample_params, temperature=cfg.rollout.eval_temperature)
    summary: dict[str, Any] = {"output_dir": str(out)}

    # ---- supervised warm start (fresh runs only) and the held-out score before RL
    if resume_dir is None and (cfg.sft.steps > 0 or cfg.sft.copy_steps > 0):
        guard.phase = "the warm start"
        summary["sft"] = warm_start(cfg, policy, tokenizer, env, kb, retriever, worlds, train_samples)
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
        summary["params"] = lora.trainable_summary(policy)

    # ---- algorithm, optimiser, data stream, batch source
    preset = preset_for(cfg.algorithm)  # name (+ policy_loss override), the same resolution on every backend
    learner = Learner(cfg, policy, tokenizer, device, preset)
    stream = QuestionStream(train_samples, seed=cfg.data.seed)
    start_step = 0
    if resume_dir is not None:
        learner.load_state_dict(resume_state)
        stream.load_state_dict(resume_state["data"])
        restore_rng_state(resume_state["rng"], getattr(engine, "generator", None))
        start_step = int(resume_state["step"])
        print(f"[openrlhf-search] resumed from {resume_dir} at step {start_step}")
    score = functools.partial(score_trajectories, reward_fn=reward_fn, tokenizer=tokenizer)
    source = build_source(cfg, policy, engine, env, tokenizer, retriever, stream, score, preset, sample_params,
                          timer, start_step, (resume_state or {}).get("producer"))

    logger = MetricsLogger(out, cfg.logging.tensorboard, cfg.logging.wandb_project,
                           resume_step=start_step if resume_dir is not None else None, run_config=config_to_dict(cfg))
    progress = Progress(cfg.steps, initial=start_step, enabled=cfg.logging.progress, time_budget=cfg.max_step_seconds)
    (out / "samples").mkdir(exist_ok=True)
    checkpointer = Checkpointer(out, cfg, policy, tokenizer, learner, source, guard)
    if resume_dir is not None:
        guard.saved = (resume_dir, start_step)
    skips = SkipMonitor(cfg.optimizer.max_skipped_steps)
    monitor = SignalMonitor(preset.name, preset.dynamic_filter, cfg.env.reward)
    summary["setup_seconds"] = time.perf_counter() - t_setup
    t_rl = time.perf_counter()
    step = start_step
    guard.deferred = True  # from here on SIGTERM/SIGINT checkpoint at the end of the step
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            guard.phase = f"RL step {step}"
            t_step = time.perf_counter()
            snapshot = source.snapshot()  # the state after step - 1 (saved if this step cannot complete)
            timer.reset()
            retrieval_calls, replicas_before = retriever.calls, replica_stats(retriever)

            # 1-3. rollout, reward, DSPO/DAPO filtering
            try:
                batch, metrics = source.next_batch()
            except Exception as exc:
                if not is_retrieval_failure(exc):
                    raise
                saved = checkpointer.save(step - 1, snapshot)
                raise RetrieverDownError(f"step {step}: the retriever failed: {exc} (state after step {step - 1} "
                                         f"saved in {saved}; rerun with --resume)") from exc
            metrics.update(batch.metrics)
            sampled = batch.all_trajectories  # kept or dropped by the filter: every statistic covers all of them
            metrics["reward_mean"] = batch.metrics.get("reward_all_mean", _mean(batch.all_rewards))
            metrics["samples"] = batch.samples_used
            if sampled:
                metrics.update(trajectory_stats(sampled))
                metrics.update(retrieval_metrics(sampled, timer.seconds.get("retrieval", 0.0),
                                                 retriever.calls - retrieval_calls))
            metrics.update(replica_metrics(replicas_before, replica_stats(retriever)))  # failovers of the step
            warning = monitor.update(step, sampled, batch.all_rewards)
            if monitor.last is not None and monitor.last.groups:
                metrics["reward_flat_group_frac"] = monitor.last.flat_groups / monitor.last.groups
            if warning:
                progress.write(f"[openrlhf-search] WARNING: {warning}")

            # 4-6. advantages, old log-probs, updates
            t_update = time.perf_counter()
            result = None
            if batch.trajectories:
                result = learner.learn(batch, source.version)
                metrics.update(result.metrics)
                source.after_update(policy)
                skips.update(step, math.isnan(result.metrics.get("update/grad_norm", float("nan"))),
                             str(guard.saved[0]) if guard.saved else None)
            else:
                metrics["update/skipped_empty_batch"] = 1.0
                source.after_update(None)
            t_end = time.perf_counter()

            # 7. timing, logging, samples, checkpoints
            metrics.update(step_times(timer.reset(), t_end - t_step, t_end - t_update))
            metrics.update(source.step_metrics(metrics, t_end - t_step))
            metrics["lr"] = learner.sched.get_last_lr()[0]
            release_freed_memory()  # the step's freed activations go back to the system (see trainer.memory)
            metrics.update(memory_metrics())
            if cfg.logging.eval_every and step % cfg.logging.eval_every == 0 and step < cfg.steps:
                ev = evaluate_policy(source.eval_engine, source.eval_env, eval_samples, tokenizer, eval_params)
                metrics.update({f"eval/{k}": v for k, v in ev.items()})
            logger.log(step, metrics, histograms=source.histograms())
            first = step == start_step + 1
            if sampled and cfg.logging.rollout_every and (step % cfg.logging.rollout_every == 0 or first):
                write_rollout_records(out, step, batch, result, policy, tokenizer, cfg)
            if sampled and cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or first):
                write_sample(out, step, batch, tokenizer)
            progress.update(reward=metrics["reward_mean"], step_s=metrics["time/step"],
                            **source.progress_fields(metrics))
            if checkpointer.due(step):
                checkpointer.save(step)
            if guard.requested:
                progress.close()
                logger.close()
                raise Preempted(guard.requested, checkpointer.save(step), step)
            if cfg.max_step_seconds and time.perf_counter() - t_rl > cfg.max_step_seconds:
                print(f"\n[openrlhf-search] RL time budget max_step_seconds={cfg.max_step_seconds} reached at step "
                      f"{step}")
                break
    finally:
        source.close(policy)
    progress.close()
    summary["steps_done"] = step
    summary["rl_seconds"] = time.perf_counter() - t_rl
    summary["learning_signal"] = monitor.summary()

    # ---- final checkpoint, held-out evaluation, plot
    final_dir = checkpointer.save(step)
    guard.deferred = False  # a signal during the final evaluation stops at once (the checkpoint is written)
    guard.phase = "the final evaluation"
    if guard.requested:
        raise Preempted(guard.requested, final_dir, step)
    summary["checkpoint"] = str(final_dir)
    summary["eval_after"] = evaluate_policy(engine, env, eval_samples, tokenizer, eval_params,
                                            rollouts_path=out / "eval_after_rollouts.jsonl")
    if eval_samples:
        final = run_rollouts(engine, env, eval_samples[:1], 1, eval_params)[0]
        summary["final_sample"] = render_trajectory(final, tokenizer, score([final])[0][0])
    logger.close()
    plot = plot_reward_curve(out / "metrics.jsonl", out / "reward_curve.png", title=f"{cfg.algorithm.name} reward")
    summary.update(metrics_path=str(out / "metrics.jsonl"), plot=str(plot), samples_dir=str(out / "samples"))
    summary.update(reward_window_stats(out / "metrics.jsonl"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def check_staleness(cfg: TrainConfig, resuming: bool) -> None:
    """``rollout.max_staleness`` must be >= 0, and a synchronous stale queue cannot be resumed."""
    if cfg.rollout.max_staleness < 0:
        raise ValueError(f"rollout.max_staleness={cfg.rollout.max_staleness}: expected >= 0 (0 = synchronous)")
    if cfg.rollout.max_staleness > 0 and resuming and not cfg.rollout.async_producer:
        raise ValueError(f"rollout.max_staleness={cfg.rollout.max_staleness} cannot --resume: the queue of stale "
                         "batches is not checkpointed (start a new run or resume with rollout.max_staleness=0)")


def build_source(cfg: TrainConfig, policy, engine, env, tokenizer, retriever, stream, score, preset, params, timer,
                 start_version: int, producer_state: bytes | None = None) -> BatchSource:
    """The configured :class:`~openrlhf_search.trainer.sources.BatchSource`: the asynchronous producer
    (``rollout.async_producer``), a stale queue (``rollout.max_staleness > 0``) or the synchronous loop.

    The asynchronous producer samples from its own copy of the weights (``shadow``) and owns ``engine`` until it is
    closed, so mid-run evaluation (``logging.eval_every``) samples from the learner's policy through its own HF
    engine and environment (greedy by default, so the figures do not depend on the engine). ``producer_state``: the
    resume checkpoint's exact producer state (its open groups); the other sources serve its requeued questions.
    """
    ro = cfg.rollout
    if ro.async_producer:
        shadow = copy.deepcopy(policy).eval().requires_grad_(False)  # the engine's own weights
        producer = AsyncProducer(
            engine, shadow, build_env(cfg, tokenizer, retriever), stream, score, batch_size=ro.prompts_per_step,
            group_size=ro.group_size, params=params, max_staleness=ro.max_staleness,
            partial_rollouts=ro.partial_rollouts, weight_sync_turns=ro.weight_sync_turns,
            dynamic_filtering=preset.dynamic_filter, max_filter_rounds=ro.max_filter_rounds,
            start_version=start_version, timer=timer, state=producer_state)
        if producer.restore_note:
            print(f"[openrlhf-search] the checkpoint's rollout producer state is not used ({producer.restore_note}): "
                  "its open groups' questions are sampled again (nothing lost or repeated, but not the exact "
                  "continuation)")
        return AsyncSource(producer, engine, HFEngine(policy, tokenizer, seed=cfg.seed + 1),
                           build_env(cfg, tokenizer, retriever))
    shape = dict(prompts_per_step=ro.prompts_per_step, group_size=ro.group_size, params=params,
                 dynamic_filtering=preset.dynamic_filter, max_filter_rounds=ro.max_filter_rounds, timer=timer,
                 start_version=start_version)
    if ro.max_staleness > 0:
        return StaleQueueSource(engine, env, stream, score, max_staleness=ro.max_staleness, **shape)
    return SyncSource(engine, env, stream, score, **shape)


def step_times(phases: dict[str, float], step_seconds: float, update_seconds: float) -> dict[str, float]:
    """The step's wall-time split: ``time/generation``, ``/retrieval``, ``/env`` (the environment without the
    retriever), ``/update``, ``/other`` and ``/step``. With the asynchronous producer the first three are the
    producer thread's and overlap the update."""
    t = {"time/generation": phases.get("generation", 0.0), "time/retrieval": phases.get("retrieval", 0.0)}
    t["time/env"] = max(0.0, phases.get("env", 0.0) - t["time/retrieval"])
    t["time/update"] = update_seconds
    t["time/other"] = max(0.0, step_seconds - sum(t.values()))
    t["time/step"] = step_seconds
    return t


def write_sample(out: Path, step: int, batch: RolloutBatch, tokenizer) -> Path:
    """``samples/step_N.txt``: the best-rewarded and the first trajectory the step sampled (kept or not), readable."""
    trajs, rewards = batch.all_trajectories, batch.all_rewards
    best = max(range(len(trajs)), key=lambda i: rewards[i])
    path = out / "samples" / f"step_{step:06d}.txt"
    path.write_text(render_trajectory(trajs[best], tokenizer, rewards[best]) + "\n\n---\n\n"
                    + render_trajectory(trajs[0], tokenizer, rewards[0]) + "\n")
    return path


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
        if not is_retrieval_failure(exc):
            raise
        print(f"{prog}: retriever {cfg.retriever.spec or '(built-in BM25)'} failed: {exc}", file=sys.stderr)
        return EXIT_RETRIEVER


# ============================================================================================ loop pieces
def replace_params(params, **kw):
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


def write_rollout_records(out: Path, step: int, batch: RolloutBatch, result: StepResult | None, policy, tokenizer,
                          cfg) -> Path:
    """Every trajectory the step sampled as a viewer record (``rollouts/step_N.jsonl``; see
    :mod:`openrlhf_search.viewer`), whether or not an update happened.

    Trajectories trained on carry their advantages and the ratio ``pi_theta / pi_old`` after this step's update (one
    extra forward pass, only on logged steps): the drift the next epoch, or the next step off-policy, would see;
    tokens below SAPO's threshold are marked. Trajectories dynamic filtering dropped (or all of them, when the update
    was skipped) carry neither.
    """
    trained: dict[int, tuple[list, list]] = {}
    if result is not None:
        with torch.no_grad():
            rows = torch.arange(len(batch.trajectories))
            new_lp = torch.cat([response_logprobs(policy, result.packed, r, cfg.rollout.temperature)
                                for r in rows.split(16)])
        ratio = torch.exp((new_lp - result.old_lp).clamp(-20, 20)).cpu()
        adv = result.advantages.detach().float().cpu()
        if adv.dim() == 1:
            adv = adv[:, None].expand(-1, ratio.size(1))
        for i, t in enumerate(batch.trajectories):
            n = len(t.response_ids)
            trained[id(t)] = (adv[i, :n].tolist(), ratio[i, :n].tolist())
    records = []
    for t, r in zip(batch.all_trajectories, batch.all_rewards):
        adv_t, ratio_t = trained.get(id(t), (None, None))
        records.append(trajectory_record(t, tokenizer, step=step, reward=r, reward_info=t.meta.get("reward_info"),
                                         advantages=adv_t, ratios=ratio_t))
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


def reward_window_stats(metrics_path: Path, window: int = 10) -> dict[str, float]:
    """Mean ``reward_mean`` of the first and last ``window`` steps, and their difference."""
    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("reward_mean"), (int, float))]
    if not rows:
        return {}
    w = min(window, max(1, len(rows) // 2))
    first = sum(r["reward_mean"] for r in rows[:w]) / w
    last = sum(r["reward_mean"] for r in rows[-w:]) / w
    return {"reward_first_window": first, "reward_last_window": last, "reward_gain": last - first, "window": w}


def warm_start(cfg: TrainConfig, policy, tokenizer, env, kb, retriever, worlds: list | None = None,
               train_samples: list | None = None) -> dict:
    """SFT on demonstrations (prompt ids from the environment itself).

    ``sft.demonstrations: synthetic``: imperfect demonstrations answer ``kb``'s train questions through
    ``retriever``, or, given ``worlds`` (:func:`build_demo_worlds`), the train questions of those fresh worlds with
    their supporting passage observed. ``retrieved``: the ``train_samples`` played through ``env``
    (:func:`~openrlhf_search.trainer.sft.retrieved_demonstrations`).
    """
    if cfg.sft.demonstrations == "retrieved":
        return warm_start_retrieved(cfg, policy, tokenizer, env, train_samples or [])
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


def warm_start_retrieved(cfg: TrainConfig, policy, tokenizer, env, train_samples: list) -> dict:
    """SFT on demonstrations played on the training questions (``sft.demonstrations: retrieved``); at most
    ``sft.num_demos`` questions, ``sft.steps`` steps (cycling through the demonstrations)."""
    t0 = time.perf_counter()
    demos = retrieved_demonstrations(env, train_samples[: cfg.sft.num_demos])
    print(f"[sft] {demos.counts['kept']} demonstrations from {demos.counts['questions']} training questions "
          f"({demos.counts['answer_not_retrieved']} dropped: no golden answer in the retrieved passages)", flush=True)
    if not demos.examples:
        raise ValueError("sft.demonstrations=retrieved: no training question has a golden answer in its retrieved "
                         "passages (check retriever.spec and env.topk / env.max_obs_tokens)")
    bar = Progress(cfg.sft.steps, enabled=cfg.logging.progress, desc="warm start: SFT")
    losses = run_sft(policy, demos.examples, cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr, tokenizer.pad_token_id,
                     seed=cfg.seed, log=lambda step, loss: bar.update(loss=loss))
    bar.close()
    return {"steps": cfg.sft.steps, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "demo_accuracy": 1.0, **demos.counts,
            "seconds": time.perf_counter() - t0}
