"""The config loader: typed fields, dotted overrides, unknown keys rejected with the key and its source named."""

from __future__ import annotations

from pathlib import Path

import pytest

from openrlhf_search.trainer.config import ConfigError, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["optimizer.lr=3e-4", "rollout.group_size=4", "algorithm.loss_overrides={clip_low: 0.1}",
                             "logging.tensorboard=false", "data.train_files=[a.jsonl, b.jsonl]"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.rollout.group_size == 4
    assert cfg.algorithm.loss_overrides == {"clip_low": 0.1}
    assert cfg.logging.tensorboard is False
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optimizer:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "optimizer.learning_rate" in msg and str(f) in msg and "lr" in msg  # the valid keys are listed


def test_unknown_top_level_section_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("steps: 3\ntrainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'"):
        load_config(f)


def test_unknown_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'rollout\.groupsize=4'.*unknown key 'rollout\.groupsize'"):
        load_config(None, ["rollout.groupsize=4"])


def test_wrong_type_is_reported_with_the_field():
    with pytest.raises(ConfigError, match=r"'steps' must be int"):
        load_config(None, ["steps=many"])
    with pytest.raises(ConfigError, match=r"'steps' is not a section"):
        load_config(None, ["steps.x=1"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["steps"])


def test_every_example_config_loads():
    files = sorted((REPO / "examples" / "configs").glob("*.yaml"))
    assert files, "no example configs"
    for f in files:
        load_config(f)


def test_quickstart_yaml_mirrors_the_builtin_config():
    from openrlhf_search.trainer.cli_quickstart import QUICKSTART
    from openrlhf_search.trainer.config import config_from_dict

    assert load_config(REPO / "examples" / "configs" / "quickstart.yaml") == config_from_dict(QUICKSTART)
