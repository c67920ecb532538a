"""A policy loss with a hyperparameter of its own (``tests/algorithms/plugins/scaled_loss_plugin.py``: one file, one
registration), configured from the config tree, runs through every backend's code path and its hyperparameter
reaches each: the local trainer (a real ``train`` run), the OpenRLHF adapter (the launcher's patch config read back in
a fresh process, installed by ``patches.install_loss`` and driven through OpenRLHF's optimizer-step windows, faked
like the other main-suite patch tests since OpenRLHF is not installed here) and the Megatron actor (the launcher's
backend config read back by ``MegatronActorCore`` on a CPU gloo rank, ``fit`` through megatron's schedule).

``adv_scale`` multiplies the advantages, so the loss is ``adv_scale`` times GRPO's and the loss reports it as the
metric ``adv_scale``: a path that drops the hyperparameter (or the loss config) gives GRPO's value and 1.0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from openrlhf_search.algorithms.losses import PolicyLoss, get_policy_loss, make_config
from openrlhf_search.integrations.openrlhf.config import PATCH_CONFIG_ENV, to_json_file
from openrlhf_search.integrations.openrlhf.plan import build_plan
from openrlhf_search.plugins import load_plugins
from openrlhf_search.trainer.config import load_config

PLUGIN = Path(__file__).parent / "plugins" / "scaled_loss_plugin.py"
REPO = Path(__file__).resolve().parents[2]
SCALE = 3.0
SELECT = [f"plugins=[{PLUGIN}]", "algorithm.name=grpo", "algorithm.policy_loss=scaled_adv",
          f"algorithm.loss_overrides={{adv_scale: {SCALE}}}"]  # fmt: skip


def _batch(b=4, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :2] = False
    mask[2, 4:] = False
    old = -torch.rand(b, t, generator=g) - 0.1
    new = (old + 0.05 * torch.randn(b, t, generator=g)).requires_grad_()
    adv = torch.randn(b, generator=g)
    return new, old, adv, mask


def test_plugin_loss_meets_the_protocol_and_its_config_is_checked():
    load_plugins([str(PLUGIN)])
    loss = get_policy_loss("scaled_adv", adv_scale=SCALE, clip_high=0.28)
    assert isinstance(loss, PolicyLoss) and loss.config.adv_scale == SCALE and loss.config.clip_high == 0.28
    new, old, adv, mask = _batch()
    value, metrics = loss(new, old, adv, mask)
    ref, _ = get_policy_loss("grpo", clip_high=0.28)(new, old, adv, mask)
    assert value.item() == pytest.approx(SCALE * ref.item(), rel=1e-6) and metrics["adv_scale"] == SCALE
    assert set(loss.normalizers(mask, adv)) == {"normalizer"}
    assert make_config("scaled_adv", adv_scale=2.0).adv_scale == 2.0  # what the launchers validate with
    with pytest.raises(TypeError, match=r"unknown config key\(s\) \['adv_scal'\].*'adv_scale'"):
        get_policy_loss("scaled_adv", adv_scal=2.0)
    with pytest.raises(ValueError, match="adv_scale=0"):
        get_policy_loss("scaled_adv", adv_scale=0)
    with pytest.raises(TypeError, match="unknown config key"):  # a built-in loss does not take it
        get_policy_loss("grpo", adv_scale=2.0)


def test_local_trainer_runs_the_plugin_loss_from_the_config(tmp_path):
    out = tmp_path / "run"
    smoke = REPO / "examples" / "configs" / "smoke.yaml"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", "train", "--config", str(smoke),
                          f"logging.output_dir={out}", "steps=1", "sft.steps=0", "logging.save_every=0", *SELECT],
                         capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows and rows[-1]["loss/adv_scale"] == SCALE


# What runs in an OpenRLHF policy actor: the patch config the launcher wrote, our install_loss on a trainer, and
# OpenRLHF 0.11.2's ppo_train loop over its optimizer-step windows (iter_grad_accum_global_norm: gas micro-batches
# per window, each given the window's counts / gas). OpenRLHF itself is faked (not installed in this environment).
OPENRLHF_SIDE = textwrap.dedent("""
    import json, sys, types
    from types import SimpleNamespace
    import torch

    def _window_counts(window, gas):
        return {"batch_num_tokens": sum(float(e.action_mask.sum()) for e in window) / gas,
                "global_batch_size": sum(float((e.action_mask.sum(-1) > 0).sum()) for e in window) / gas,
                "dp_size": 1}

    def iter_grad_accum_global_norm(data_iter, strategy, gas, mask_fn):  # OpenRLHF's windows, as in 0.11.2
        window = []
        for item in data_iter:
            window.append(item)
            if len(window) == gas:
                info = _window_counts(window, gas)
                yield from ((it, info) for it in window)
                window = []

    ppo_actor = types.ModuleType("openrlhf.trainer.ray.ppo_actor")
    ppo_actor.iter_grad_accum_global_norm = iter_grad_accum_global_norm
    loss_utils = types.ModuleType("openrlhf.utils.loss_utils")
    loss_utils._get_dp_group = lambda strategy: None
    for name in ("openrlhf", "openrlhf.trainer", "openrlhf.trainer.ray", "openrlhf.utils"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["openrlhf.trainer.ray.ppo_actor"] = ppo_actor
    sys.modules["openrlhf.utils.loss_utils"] = loss_utils

    from openrlhf_search.algorithms.losses import get_policy_loss
    from openrlhf_search.integrations.openrlhf.config import PATCH_CONFIG_ENV, PatchConfig, from_env
    from openrlhf_search.integrations.openrlhf.patches import install_loss

    patch = from_env(PatchConfig, PATCH_CONFIG_ENV)
    trainer = SimpleNamespace(strategy=SimpleNamespace(accumulated_gradient=2), actor_loss_fn=None,
                              training_step=lambda exp, kl, step, info=None: {"metrics": {}, "weights": {}})
    install_loss(trainer, patch)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[3, 3:] = False
    old = -torch.rand(4, 6, generator=g) - 0.1
    new = (old + 0.05 * torch.randn(4, 6, generator=g)).requires_grad_()
    adv = torch.randn(4, generator=g)[:, None].expand(4, 6).contiguous()
    exps = [SimpleNamespace(action_mask=mask[r], advantages=adv[r], rows=r) for r in (slice(0, 2), slice(2, 4))]
    total = 0.0
    windows = ppo_actor.iter_grad_accum_global_norm(iter(exps), trainer.strategy, 2, lambda e: e.action_mask)
    for exp, info in windows:  # DeepSpeed scales each backward by 1/gas
        loss, *_ = trainer.actor_loss_fn(new[exp.rows], old[exp.rows], adv[exp.rows], action_mask=mask[exp.rows],
                                         **info)
        total = total + loss / 2
    grpo, _ = get_policy_loss("grpo")(new, old, adv, mask)
    print(json.dumps({"total": float(total), "grpo": float(grpo), "loss_name": patch.loss,
                      "metrics": trainer.actor_loss_fn.last_metrics}))
""")


def test_openrlhf_adapter_runs_the_plugin_loss_from_the_launchers_patch_config(tmp_path):
    cfg = load_config(None, ["model.path=/models/m", "retriever.spec=http://127.0.0.1:1", *SELECT])
    plan = build_plan(cfg)
    assert plan.patch_config.loss == "scaled_adv" and plan.patch_config.loss_config == {"adv_scale": SCALE}
    patch_file = to_json_file(plan.patch_config, tmp_path / "patch.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), PATCH_CONFIG_ENV: str(patch_file)}
    out = subprocess.run([sys.executable, "-c", OPENRLHF_SIDE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["metrics"]["search_loss/adv_scale"] == SCALE
    assert abs(got["grpo"]) > 1e-3 and got["total"] == pytest.approx(SCALE * got["grpo"], rel=1e-5)
