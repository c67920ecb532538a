"""The one config tree: every backend's sections in one typed tree, one loader, file:line errors, derived views."""

from __future__ import annotations

import dataclasses
import json

import pytest

from openrlhf_search.env.search_env import EnvConfig as SearchEnvConfig
from openrlhf_search.integrations.megatron.config import MegatronActorConfig
from openrlhf_search.integrations.openrlhf.config import AgentConfig, agent_config_from_tree
from openrlhf_search.integrations.openrlhf.plan import build_plan
from openrlhf_search.trainer.config import (
    ConfigError,
    EnvConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    save_config,
    search_env_config,
)
from openrlhf_search.trainer.validate import validate_config


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_names_file_and_line(tmp_path):
    path = _write(tmp_path, "steps: 3\noptimizer:\n  lr: 0.1\n  weight_decy: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:4" in msg and "optimizer.weight_decy" in msg and "did you mean 'weight_decay'" in msg


def test_nested_unknown_key_in_a_backend_section_names_its_line(tmp_path):
    path = _write(tmp_path, "backend: megatron\nmegatron:\n  parallel:\n    tensor_parallel: 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: unknown key 'megatron\.parallel\.tensor_parallel'"):
        load_config(path)


def test_all_problems_are_reported_at_once(tmp_path):
    path = _write(tmp_path, "rollout:\n  group_sise: 4\nenv:\n  max_turns: many\nopenrlhf:\n  zero_stag: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["algorithm.nam=grpo"])
    msg = str(err.value)
    assert "4 config problem(s)" in msg
    for where in (f"{path}:2", f"{path}:4", f"{path}:6", "override 'algorithm.nam=grpo'"):
        assert where in msg


def test_yaml11_float_strings_reach_every_backend_as_floats(tmp_path):
    """#11: YAML 1.1 reads `1e-6` as the string '1e-6'; the loader converts it where a float belongs."""
    path = _write(tmp_path, "model: {path: /models/qwen}\nretriever: {spec: /idx}\noptimizer:\n  lr: 1e-6\n"
                            "backend: megatron\nmegatron:\n  weight_decay: 1e-2\n"
                            "openrlhf: {actor_num_gpus_per_node: 2, vllm_gpu_memory_utilization: 5e-1,\n"
                            "           colocate_all: false, vllm_num_engines: 2}\n")
    import yaml

    assert yaml.safe_load(path.read_text())["optimizer"]["lr"] == "1e-6"  # the trap this guards against
    cfg = load_config(path)
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 1e-6
    plan = build_plan(cfg)
    assert flag_value(plan.command, "--actor.adam.lr") == "1e-06"  # the OpenRLHF flag
    megatron = plan.megatron_config.megatron
    assert isinstance(megatron.lr, float) and megatron.lr == 1e-6  # inherited from optimizer.lr
    assert isinstance(megatron.weight_decay, float) and megatron.weight_decay == 0.01
    assert flag_value(plan.command, "--vllm.gpu_memory_utilization") == "0.5"
    # ... and through the JSON transport into the Megatron actors, also when a hand-written file has a string
    out = tmp_path / "megatron.json"
    plan.megatron_config.to_json_file(str(out))
    data = json.loads(out.read_text())
    data["megatron"]["lr"] = "1e-6"
    again = MegatronActorConfig.from_dict(data, source=str(out))
    assert isinstance(again.megatron.lr, float) and again.megatron.lr == 1e-6


def test_a_string_that_is_no_number_names_key_and_file(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: 'optimizer.lr' must be float, got 'fast'"):
        load_config(path)
    with pytest.raises(ValueError, match=r"'megatron\.lr' must be float"):
        MegatronActorConfig.from_dict({"strategy": "megatron", "megatron": {"lr": "fast"}}, source="m.json")


def test_choices_are_checked_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"'megatron\.precision' must be one of .*did you mean 'bf16'"):
        load_config(None, ["megatron.precision=bf61"])
    with pytest.raises(ConfigError, match=r"'openrlhf\.strategy' must be one of"):
        load_config(None, ["openrlhf.strategy=fsdp"])
    # the backend is a registry name (a plugin may add one): checked with the sections, "did you mean" included
    problems = validate_config(load_config(None, ["backend=openrlfh"]), check_files=False)
    assert any(p.startswith("backend='openrlfh': unknown backend") and "did you mean 'openrlhf'" in p
               for p in problems), problems


def test_every_section_is_settable_from_the_command_line():
    cfg = load_config(None, ["openrlhf.zero_stage=3", "backend=megatron",
                             "megatron.parallel.tensor_model_parallel_size=2", "megatron.precision=fp32",
                             "env.end_on_eos=false", "env.max_docs_per_turn=4",
                             "plugins=[my.plugin]", "algorithm.advantage_postprocessors=[calibadv]",
                             "retriever.timeout=5"])  # fmt: skip
    assert cfg.openrlhf.zero_stage == 3 and cfg.backend == "megatron" and cfg.megatron.precision == "fp32"
    assert cfg.megatron.parallel.tensor_model_parallel_size == 2
    assert cfg.env.end_on_eos is False and cfg.env.max_docs_per_turn == 4 and cfg.plugins == ["my.plugin"]
    assert cfg.algorithm.advantage_postprocessors == ["calibadv"] and cfg.retriever.timeout == 5.0


def test_megatron_actor_section_is_refused_with_the_reason(tmp_path):
    path = _write(tmp_path, "backend: megatron\nmegatron_actor:\n  loss: sapo\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: unknown key 'megatron_actor'.*come from algorithm/rollout"):
        load_config(path)


def test_env_section_exposes_every_search_env_field_with_the_same_defaults():
    env_fields = {f.name for f in dataclasses.fields(SearchEnvConfig)} - {"topk"}  # topk is retriever.topk
    section = {f.name for f in dataclasses.fields(EnvConfig)}
    assert env_fields <= section, f"env section lacks {sorted(env_fields - section)}"
    assert search_env_config(TrainConfig()) == SearchEnvConfig()  # one set of defaults (Search-R1's)
    cfg = load_config(None, ["env.max_turns=2", "env.forbid_search_on_last_turn=false", "retriever.topk=5"])
    built = search_env_config(cfg)
    assert built.max_turns == 2 and built.forbid_search_on_last_turn is False and built.topk == 5


def test_agent_config_is_a_view_of_the_tree_with_the_same_defaults():
    tree = TrainConfig()
    agent = agent_config_from_tree(tree, "http://h:1")
    assert agent == AgentConfig(retrieval_url="http://h:1")  # the agent's own defaults are the tree's
    assert agent.env == tree.env  # the env section itself, embedded
    cfg = load_config(None, ["env.max_turns=2", "env.min_turn_tokens=8", "retriever.topk=4", "plugins=[json]",
                             "env.reward=format_f1", "retriever.timeout=7"])  # fmt: skip
    agent = agent_config_from_tree(cfg, "http://h:1")
    assert agent.search_env_config() == search_env_config(cfg)  # the agent runs the local env's limits
    assert agent.plugins == ["json"] and agent.env.reward == "format_f1" and agent.request_timeout == 7.0


def test_the_launcher_builds_its_views_only_from_the_tree(tmp_path):
    cfg = load_config(None, ["model.path=/m", "retriever.spec=http://r:1", "plugins=[json]", "env.max_turns=3",
                             "openrlhf.actor_num_gpus_per_node=2", "backend=megatron", "openrlhf.colocate_all=false",
                             "openrlhf.vllm_num_engines=2",
                             f"logging.output_dir={tmp_path}"])  # fmt: skip
    plan = build_plan(cfg)
    assert plan.agent_config.env.max_turns == 3 and plan.agent_config.plugins == ["json"]
    assert plan.patch_config.plugins == ["json"] and plan.megatron_config.actor.plugins == ["json"]
    assert flag_value(plan.command, "--actor.num_gpus_per_node") == "2"


def test_saved_config_reloads_to_the_same_tree(tmp_path):
    cfg = load_config(None, ["backend=megatron", "megatron.lr=2e-6", "openrlhf.zero_stage=3", "plugins=[a.b]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_to_dict(cfg)["megatron"]["parallel"]["tensor_model_parallel_size"] == 1


def test_docs_reference_is_generated_from_the_config():
    """docs/trainer.md's configuration reference is exactly what ``openrlhf-search config --markdown`` prints (the
    field docstrings), so a new field or docstring cannot be missing from it."""
    import importlib.util
    from pathlib import Path

    from openrlhf_search.trainer.cli_config import reference_table

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("config_reference", root / "scripts" / "config_reference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    docs = (root / "docs" / "trainer.md").read_text(encoding="utf-8")
    assert script.regenerated(docs) == docs, "docs/trainer.md is out of date: python scripts/config_reference.py"
    table = reference_table()
    assert all(any(row.startswith(f"| `{k}` |") for row in table) for k in ("env.topk", "openrlhf.strategy",
                                                                               "megatron.parallel.sequence_parallel"))



def test_each_section_is_declared_once_by_its_owner():
    """Every section of the tree is the dataclass its owning package registers (no copy in the trainer)."""
    import typing

    from openrlhf_search.config import SECTIONS
    from openrlhf_search.trainer.config import TrainConfig

    owners = {"model": "trainer.config", "optimizer": "trainer.config", "sft": "trainer.config",
              "logging": "trainer.config", "data": "data.config", "retriever": "retrieval.config",
              "env": "env.config", "rollout": "rollout.config", "algorithm": "algorithms.config",
              "openrlhf": "integrations.openrlhf.config", "megatron": "integrations.megatron.config"}  # fmt: skip
    hints = typing.get_type_hints(TrainConfig)
    for name, module in owners.items():
        assert SECTIONS.get(name).__module__ == f"openrlhf_search.{module}", name
        assert hints[name] is SECTIONS.get(name), name
