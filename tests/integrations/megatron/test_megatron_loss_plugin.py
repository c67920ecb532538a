"""A policy loss with its own hyperparameter (``tests/algorithms/plugins/scaled_loss_plugin.py``) through the
Megatron backend's code path: the OpenRLHF launcher's backend config (``backend: megatron``) is read back by a
:class:`MegatronActorCore` on one CPU gloo rank, which imports the plugin, builds the loss from the config and trains
through megatron's schedule. With old log-probs equal to the actor's own (ratio 1) GRPO's token-mean loss is minus
the masked mean advantage, so the plugin's is ``adv_scale`` times that; a path that drops ``adv_scale`` gives 1x.
The other two backends' paths are in ``tests/algorithms/test_loss_plugin.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed")
pytest.importorskip("mbridge", reason="mbridge is not installed")

pytestmark = pytest.mark.megatron

REPO = Path(__file__).resolve().parents[3]
WORKER = str(Path(__file__).with_name("loss_plugin_worker.py"))
PLUGIN = REPO / "tests" / "algorithms" / "plugins" / "scaled_loss_plugin.py"
SCALE = 3.0


def test_megatron_actor_runs_the_plugin_loss_from_the_launchers_megatron_config(tmp_path, monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_search.integrations.megatron.config import MEGATRON_CONFIG_ENV
    from openrlhf_search.integrations.megatron.launch import run_local_ranks
    from openrlhf_search.integrations.openrlhf.plan import build_plan
    from openrlhf_search.trainer.config import load_config

    # strategy megatron with colocate_all off puts vLLM on a node of its own: a 2-node layout, which needs a shared
    # directory and a retriever address other nodes can reach (never contacted here)
    cfg = load_config(None, ["model.path=/models/m", "retriever.spec=http://10.0.0.1:1", f"plugins=[{PLUGIN}]",
                             f"openrlhf.shared_dir={tmp_path / 'shared'}",
                             "algorithm.name=grpo", "algorithm.policy_loss=scaled_adv",
                             f"algorithm.loss_overrides={{adv_scale: {SCALE}}}", "backend=megatron",
                             "openrlhf.colocate_all=false", "rollout.prompts_per_step=2", "rollout.group_size=2",
                             "algorithm.num_minibatches=1", "openrlhf.actor_num_gpus_per_node=1",
                             "megatron.micro_batch_size=1"])  # fmt: skip
    plan = build_plan(cfg)
    megatron_file = plan.megatron_config.to_json_file(str(tmp_path / "megatron.json"))
    monkeypatch.setenv(MEGATRON_CONFIG_ENV, megatron_file)
    torch.manual_seed(0)
    model = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                 initializer_range=0.15)).save_pretrained(model)  # fmt: skip
    run_local_ranks(WORKER, 1, ["--model", str(model), "--out", str(tmp_path)], timeout=300)
    got = json.loads((tmp_path / "status.json").read_text())
    assert got["loss"] == "scaled_adv" and got["status"]["adv_scale"] == SCALE
    assert abs(got["mean_adv"]) > 0.05
    assert got["status"]["policy_loss"] == pytest.approx(-SCALE * got["mean_adv"], rel=1e-4)
