"""The backend registry: a plugin backend runs through ``train``; every environment field reaches every front end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from openrlhf_search.backends import BACKENDS
from openrlhf_search.cli import main
from openrlhf_search.env.config import EnvConfig
from openrlhf_search.integrations.openrlhf.config import AgentConfig, agent_config_from_tree, from_dict
from openrlhf_search.trainer.config import load_config, search_env_config

PLUGIN = Path(__file__).resolve().parent / "plugins" / "dummy_backend.py"


def _config(tmp_path, body: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"plugins: [{PLUGIN}]\nbackend: dummy\nsteps: 3\nlogging: {{output_dir: {tmp_path / 'run'}}}\n"
                    + body)
    return path


def test_builtin_backends_are_registered():
    assert {"local", "openrlhf", "megatron"} <= set(BACKENDS.names())


def test_a_plugin_backend_runs_through_train(tmp_path, capsys):
    out = tmp_path / "dummy.json"
    path = _config(tmp_path, f"dummy:\n  out: {out}\n  greeting: hi\nenv: {{topk: 2}}\n")
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert "dummy backend: would write" in capsys.readouterr().out and not out.exists()
    assert main(["train", "--config", str(path), "--resume-or-start"]) == 0
    assert json.loads(out.read_text()) == {"greeting": "hi", "steps": 3, "mode": "resume_or_start",
                                           "algorithm": "dspo", "topk": 2}


def test_a_plugin_backend_section_is_typed_and_validated(tmp_path, capsys):
    path = _config(tmp_path, "dummy:\n  greting: hi\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:6: unknown key 'dummy.greting' (did you mean 'greeting'" in err  # file:line of the typo
    assert "dummy.out: the dummy backend needs a file" in err  # and the backend's own check, in the same report


def _non_default(f: dataclasses.Field):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return {int: 7, bool: not default, str: "x", float: 0.5}.get(type(default), None) if default is not None else 5


def test_every_env_field_reaches_the_local_env_and_the_openrlhf_agent():
    """Every field of the one EnvConfig (a new one included, with no other edit) set in the tree reaches the local
    trainer's environment config and the OpenRLHF agent's JSON config unchanged."""
    overrides = {}
    for f in dataclasses.fields(EnvConfig):
        value = _non_default(f)
        if value is not None and f.name not in ("template", "reward", "tools"):
            overrides[f.name] = value
    assert {"max_turns", "topk", "end_on_eos", "open_page_tokens"} <= set(overrides)
    cfg = load_config(None, [f"env.{k}={v}" for k, v in overrides.items()] + ["env.tool_options={search: {}}"])
    local = search_env_config(cfg)
    agent = agent_config_from_tree(cfg, "http://h:1")
    shipped = from_dict(AgentConfig, json.loads(json.dumps(dataclasses.asdict(agent))), "agent.json")
    for name, value in overrides.items():
        assert getattr(local, name) == value, name
        assert getattr(shipped.search_env_config(), name) == value, name
    assert shipped.search_env_config() == local


def test_budgets_far_beyond_the_cpu_are_warned_about():
    """Search-R1's budgets (4 turns x 500 tokens, 4 x 8 samples) with SmolLM2 on the CPU: about an hour per RL step
    (2 steps took 586 s with a smaller batch), so the dry run and the run say so; the quickstart's budgets do not."""
    from openrlhf_search.trainer.backend import budget_warnings

    (warning,) = budget_warnings(load_config(None, ["model.path=smollm2", "device=cpu", "steps=2"]))
    assert "64000 tokens" in warning and "env.max_turns=4" in warning and "min per step" in warning
    timed = budget_warnings(load_config(None, ["model.path=smollm2", "device=cpu", "max_step_seconds=600"]))
    assert "max_step_seconds=600 allows about 0.2 steps" in timed[0]
    root = Path(__file__).resolve().parents[2]
    assert budget_warnings(load_config(root / "examples" / "configs" / "quickstart.yaml", ["device=cpu"])) == []
    assert budget_warnings(load_config(None, ["model.path=smollm2", "device=cuda"])) == []  # no CPU figure for a GPU
