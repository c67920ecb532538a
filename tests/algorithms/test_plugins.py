"""One plugin mechanism: a user's estimator, post-processor and loss, registered in their own module listed in
``plugins:``, resolve in a fresh process through the code paths the OpenRLHF patch module and the Megatron actor use
(no OpenRLHF, Ray or megatron-core needed), and the launcher needs no change for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from openrlhf_search.integrations.megatron.config import MEGATRON_CONFIG_ENV
from openrlhf_search.integrations.openrlhf.config import PATCH_CONFIG_ENV, to_json_file
from openrlhf_search.integrations.openrlhf.plan import build_plan
from openrlhf_search.plugins import PluginError, load_plugins
from openrlhf_search.trainer.config import load_config

PLUGIN = Path(__file__).parent / "plugins" / "user_plugin.py"
REPO = Path(__file__).resolve().parents[2]

# What runs in a Ray actor: read the JSON views, import plugins, resolve names -- nothing imported by the driver.
ACTOR_SIDE = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    import torch
    assert "openrlhf" not in sys.modules
    from openrlhf_search.integrations.openrlhf.config import PATCH_CONFIG_ENV, PatchConfig, from_env
    from openrlhf_search.integrations.openrlhf.patches import postprocess_experiences
    from openrlhf_search.integrations.megatron.config import MegatronActorConfig, build_actor_loss

    patch = from_env(PatchConfig, PATCH_CONFIG_ENV)
    # two OpenRLHF micro-batches of a 2 prompts x 2 samples rollout; OpenRLHF's own advantages are garbage (9.0)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    exps = [SimpleNamespace(action_mask=mask.clone(), advantages=torch.full((2, 4), 9.0),
                            rewards=torch.tensor(r), index=torch.tensor(i), info={})
            for r, i in (([1.0, 0.0], [0, 1]), ([0.2, 0.7], [2, 3]))]
    metrics = postprocess_experiences(exps, 2, patch)
    loss = build_actor_loss(MegatronActorConfig.from_env().actor)  # the Megatron actor's path
    lp = torch.zeros(1, 3, requires_grad=True)
    value, _ = loss(lp, torch.zeros(1, 3), torch.ones(1), torch.ones(1, 3, dtype=torch.bool))
    print(json.dumps({"adv": [e.advantages.tolist() for e in exps], "metrics": metrics,
                      "loss_is_plugin": getattr(loss, "plugin", False), "loss": float(value)}))
""")


def plugin_config(tmp_path, *extra: str):
    return load_config(None, [
        "model.path=/models/m", "retriever.spec=http://127.0.0.1:1", f"plugins=[{PLUGIN}]", "algorithm.name=grpo",
        "algorithm.advantage_estimator=plugin_sign", "algorithm.advantage_postprocessors=[plugin_scale]",
        "algorithm.postprocessor_config={plugin_scale: {factor: 3.0}}", "algorithm.policy_loss=plugin_ppo",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "algorithm.num_minibatches=1",
        "openrlhf.actor_num_gpus_per_node=2", "openrlhf.micro_train_batch_size=1", f"logging.output_dir={tmp_path}",
        *extra])  # fmt: skip


def test_plugin_estimator_postprocessor_and_loss_run_in_a_fresh_actor_process(tmp_path):
    cfg = plugin_config(tmp_path, "backend=megatron", "openrlhf.colocate_all=false", "openrlhf.vllm_num_engines=2")
    plan = build_plan(cfg)  # the launcher has no table entry for any of the plugin's names
    assert plan.command[plan.command.index("--algo.advantage.estimator") + 1] == "group_norm"
    assert plan.patch_config.estimator == "plugin_sign"
    assert plan.patch_config.postprocessors == [["plugin_scale", {"factor": 3.0}]]
    assert plan.megatron_config.actor.loss == "plugin_ppo" and plan.megatron_config.actor.plugins == [str(PLUGIN)]
    patch_file = to_json_file(plan.patch_config, tmp_path / "patch.json")
    megatron_file = plan.megatron_config.to_json_file(str(tmp_path / "megatron.json"))
    env = {**os.environ, "PYTHONPATH": str(REPO), PATCH_CONFIG_ENV: str(patch_file),
           MEGATRON_CONFIG_ENV: megatron_file}
    out = subprocess.run([sys.executable, "-c", ACTOR_SIDE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # group (1.0, 0.0) -> sign +1, -1; group (0.2, 0.7) -> -1, +1; times 3 on model tokens, 0 elsewhere
    assert got["adv"] == [[[0, 3, 3, 0], [-3, -3, -3, -3]], [[0, -3, -3, 0], [3, 3, 3, 3]]]
    assert got["metrics"]["plugin/factor"] == 3.0
    assert got["loss_is_plugin"] is True


def test_deepspeed_plan_injects_the_plugin_loss(tmp_path):
    plan = build_plan(plugin_config(tmp_path))
    assert plan.patch_config.loss == "plugin_ppo" and plan.patch_config.plugins == [str(PLUGIN)]


def test_local_trainer_resolves_the_same_pipeline(tmp_path):
    from openrlhf_search.algorithms.presets import advantage_pipeline, preset_for

    cfg = plugin_config(tmp_path)
    load_plugins(cfg.plugins)
    preset = preset_for(cfg.algorithm)
    assert preset.policy_loss == "plugin_ppo"
    assert advantage_pipeline(preset, cfg.algorithm) == ("plugin_sign", {}, [("plugin_scale", {"factor": 3.0})])


def test_a_missing_plugin_is_named():
    with pytest.raises(PluginError, match=r"cannot import plugin 'no_such_pkg\.mod'"):
        load_plugins(["no_such_pkg.mod"])
