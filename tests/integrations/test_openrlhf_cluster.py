"""Cluster arithmetic (``integrations/openrlhf/cluster.py``): every rule DeepSpeed, Ray and vLLM check, and a dry run
of every launch recipe in ``examples/scripts/`` at 1, 2, 3, 4 and 8 nodes of 8 GPUs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_search.integrations.openrlhf.cluster import (
    check_cluster,
    check_command,
    cluster_from_env,
    command_layout,
    deepspeed_batch_problem,
    model_heads,
    tp_heads_problem,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "examples" / "scripts"
NODE_COUNTS = (1, 2, 3, 4, 8)
HEADS = {"3b": (16, 2), "7b": (28, 4), "14b": (40, 8), "32b": (40, 8)}
"""(attention heads, KV heads) of Qwen2.5-3B/7B/14B/32B-Instruct (their config.json)."""


def test_deepspeed_batch_assertion_is_deepspeeds_arithmetic():
    # qwen2.5_14b_2nodes.sh at NODES=3: 256 prompts x 5 / 4 minibatches = 320 on 24 ranks, micro-batch 1
    problem = deepspeed_batch_problem("actor", 320, 1, 24)
    assert problem is not None and "320 != micro-batch 1 x 13 accumulation steps x 24 ranks = 312" in problem
    assert "\n" not in problem
    for train, micro, world in ((320, 1, 16), (320, 1, 32), (320, 4, 8), (64, 2, 8)):
        assert deepspeed_batch_problem("actor", train, micro, world) is None
    assert "0 gradient-accumulation steps" in deepspeed_batch_problem("actor", 16, 4, 8)
    # planted mistake: a check of train % world alone passes 320 on 32 ranks at micro 3 (DeepSpeed: 3 x 3 x 32)
    assert "288" in deepspeed_batch_problem("actor", 320, 3, 32)


def test_vllm_and_megatron_head_rules():
    assert tp_heads_problem("vLLM", 3, 28, 4, replicate_kv=True) == (
        "vLLM TP 3 does not divide the model's 28 attention heads (28 % 3 = 1)")
    assert tp_heads_problem("vLLM", 4, 16, 2, replicate_kv=True) is None  # KV heads replicated 2x
    assert "not a multiple of the model's 4 KV heads" in tp_heads_problem("vLLM", 6, 36, 4, replicate_kv=True)
    assert tp_heads_problem("vLLM", 2, 40, 8, replicate_kv=True) is None
    assert "does not divide the model's 2 KV heads" in tp_heads_problem("Megatron", 4, 16, 2, replicate_kv=False)
    assert tp_heads_problem("vLLM", 8, None, None, replicate_kv=True) is None  # unknown model: skipped


def test_colocation_async_and_capacity_rules():
    one_node = {"actor_nodes": 1, "actor_gpus_per_node": 8, "ref_nodes": 1, "ref_gpus_per_node": 8,
                "vllm_engines": 8, "vllm_tp": 1, "cluster_nodes": 1, "cluster_gpus_per_node": 8}  # fmt: skip
    assert check_cluster(**one_node, colocate_all=True) == []
    hang = check_cluster(**one_node, colocate_all=True, async_train=True)
    assert any("async_train=true with colocate_all=true" in p and "8 GPUs" in p for p in hang)
    assert any("needs 16 GPUs (actor 8 + vLLM 8 x TP 1 = 8)" in p and "= 8" in p for p in hang)
    split = check_cluster(**one_node, colocate_all=False)
    assert split == ["the layout needs 24 GPUs (actor 8 + reference 8 + vLLM 8 x TP 1 = 8) but the cluster has 1 "
                     "nodes x 8 GPUs = 8: Ray would wait forever for the placement groups"]  # fmt: skip
    assert check_cluster(**{**one_node, "cluster_nodes": 3}, colocate_all=False) == []
    mismatch = check_cluster(**{**one_node, "vllm_engines": 4}, colocate_all=True)
    assert mismatch == ["colocate_all: vLLM 4 engines x TP 1 = 4 GPUs must equal the actor's 1 nodes x 8 GPUs = 8 "
                        "(OpenRLHF asserts it; they share one placement group)"]  # fmt: skip
    ref = check_cluster(**{**one_node, "ref_gpus_per_node": 4}, colocate_all=True)
    assert any("same layout" in p for p in ref)
    assert any("engine's TP workers on one node" in p
               for p in check_cluster(**{**one_node, "vllm_engines": 1, "vllm_tp": 16, "cluster_nodes": 2},
                                      colocate_all=False))  # fmt: skip
    assert any("4 micro-batches < 8 actor processes" in p
               for p in check_cluster(actor_nodes=1, actor_gpus_per_node=8, rollout_batch=4, n_samples=8,
                                      micro_rollout_batch=8))  # fmt: skip
    mega = check_cluster(actor_nodes=1, actor_gpus_per_node=8, strategy="megatron", megatron_tp=3, heads=40,
                         kv_heads=8, train_batch=7)  # the DeepSpeed batch rule does not apply to Megatron's actor
    assert mega == ["Megatron: TP 3 x PP 1 x CP 1 = 3 does not divide the actor's 8 ranks",
                    "Megatron TP 3 does not divide the model's 40 attention heads (40 % 3 = 1)"]  # fmt: skip


def test_command_layout_reads_openrlhf_flags_and_defaults():
    layout = command_layout(["--actor.num_nodes", "2", "--train.batch_size=96", "--train.colocate_all",
                             "--algo.kl.init_coef", "0.0", "--vllm.num_engines", "4", "--vllm.num_engines", "8"])
    assert layout["actor_nodes"] == 2 and layout["train_batch"] == 96 and layout["colocate_all"]
    assert layout["vllm_engines"] == 8  # the last occurrence wins, as in argparse (extra_args come last)
    assert layout["ref_nodes"] == 0  # no reference without KL
    assert command_layout([])["ref_nodes"] == 1  # OpenRLHF's default KL coefficient is 0.01
    assert check_command(["--actor.num_gpus_per_node", "8", "--train.batch_size", "20", "--algo.kl.init_coef", "0",
                          "--rollout.batch_size", "8"])[0].startswith("DeepSpeed (actor): train batch 20 != ")


def test_model_heads_and_slurm_cluster(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 28, "num_key_value_heads": 4}))
    assert model_heads(str(tmp_path)) == (28, 4)
    assert model_heads("Qwen/Qwen2.5-7B-Instruct") == (None, None)
    assert cluster_from_env({"SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "8"}) == (3, 8)
    assert cluster_from_env({"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:4"}) == (2, 4)
    assert cluster_from_env({"SLURM_JOB_NUM_NODES": "2"}) == (None, None)


# ------------------------------------------------------------------------------------------ every recipe
def _model_dir(tmp_path: Path, size: str) -> Path:
    path = tmp_path / f"qwen2.5-{size}"
    path.mkdir(exist_ok=True)
    heads, kv = HEADS[size]
    (path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv}))
    return path


def _recorder(tmp_path: Path, name: str) -> Path:
    """An executable that writes its argv to ``$ARGV_RECORD`` (the recipes exec the launcher; the test runs that
    exact argv in-process, which keeps a 25-launch matrix fast)."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "open(os.environ['ARGV_RECORD'], 'w').write(json.dumps(sys.argv[1:]))\n")
    path.chmod(0o755)
    return path


def _launch(script: Path, args: list[str], env: dict[str, str], tmp_path: Path, capsys,
            monkeypatch) -> tuple[int, str, str]:
    """Run the recipe (bash, for real) up to its launcher call, then that call in-process: ``(rc, stdout, stderr)``."""
    record = tmp_path / "argv.json"
    record.unlink(missing_ok=True)
    env = {**env, "ARGV_RECORD": str(record)}
    proc = subprocess.run(["bash", str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    if not record.exists():  # the recipe itself refused
        return proc.returncode, proc.stdout, proc.stderr
    argv = json.loads(record.read_text())
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE"):
        if key in env:
            monkeypatch.setenv(key, env[key])
    capsys.readouterr()
    from openrlhf_search.cli import main

    # `python -m openrlhf_search train --backend openrlhf ...` or `openrlhf-search train --backend openrlhf ...`
    rc = main(argv[2:] if argv[:2] == ["-m", "openrlhf_search"] else argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _planned_command(stdout: str) -> list[str]:
    text = stdout.replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "openrlhf.entrypoint" in x)
    tokens = shlex.split(line)
    return tokens[tokens.index("openrlhf_search.integrations.openrlhf.entrypoint") + 1 :]


def _outcome(result: tuple[int, str, str], nodes: int, size: str, **megatron) -> str:
    """'ok' (a command that passes the checks) or 'refused' (exit 2, one line on stderr)."""
    rc, out, err = result
    if rc == 0:
        heads, kv = HEADS[size]
        problems = check_command(_planned_command(out), heads=heads, kv_heads=kv, cluster_nodes=nodes,
                                 cluster_gpus_per_node=8, **megatron)  # fmt: skip
        assert problems == [], (nodes, problems)
        return "ok"
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1, (nodes, rc, err[-2000:])
    return "refused"


@pytest.mark.parametrize("recipe,size", [("qwen2.5_3b_1node.sh", "3b"), ("qwen2.5_7b_1node.sh", "7b"),
                                         ("qwen2.5_14b_2nodes.sh", "14b")])  # fmt: skip
def test_every_openrlhf_recipe_at_every_node_count(recipe, size, tmp_path, capsys, monkeypatch):
    """The recipes take NODES (slurm_openrlhf.sbatch sets it from the allocation); the launcher sees the cluster as
    a Slurm job shows it (``SLURM_JOB_NUM_NODES`` x ``SLURM_GPUS_ON_NODE``)."""
    outcomes = {}
    for nodes in NODE_COUNTS:
        env = {**os.environ, "NODES": str(nodes), "DRY_RUN": "1", "PYTHON": str(_recorder(tmp_path, "python")),
               "OUTPUT_DIR": str(tmp_path / f"out{nodes}"), "RETRIEVAL_URL": "http://10.0.0.1:8000",
               "MODEL": str(_model_dir(tmp_path, size)), "SLURM_JOB_NUM_NODES": str(nodes),
               "SLURM_GPUS_ON_NODE": "8"}  # fmt: skip
        result = _launch(SCRIPTS / "openrlhf" / recipe, ["dspo"], env, tmp_path, capsys, monkeypatch)
        outcomes[nodes] = _outcome(result, nodes, size)
        if outcomes[nodes] == "refused":
            assert re.search(r"\d+ != micro-batch \d+ x \d+ accumulation steps x \d+ ranks = \d+", result[2])
    if recipe == "qwen2.5_14b_2nodes.sh":  # 320 sequences on 24 ranks: DeepSpeed's 320 == 312 assertion
        assert outcomes == {1: "ok", 2: "ok", 3: "refused", 4: "ok", 8: "ok"}
    else:
        assert set(outcomes.values()) == {"ok"}


def _recipe_env(text: str, name: str | None = None) -> dict[str, str]:
    """The ``KEY=VALUE`` words a Megatron recipe exports (the case arm ``name)`` of megatron_slurm.sbatch)."""
    if name is not None:
        text = next(x for x in text.splitlines() if x.strip().startswith(f"{name})"))
    words = [w for line in text.splitlines() if "export" in line for w in line.split()]
    return {k: v for k, _, v in (w.partition("=") for w in words) if k.isupper() and v and "$" not in v}


@pytest.mark.parametrize("recipe,expected", [
    ("qwen2.5_14b_2nodes_ray.sh", "Roooo"), ("qwen2.5_32b_4nodes_ray.sh", "RRRoo"),
    ("megatron_slurm.sbatch:qwen2.5_14b", "Roooo"), ("megatron_slurm.sbatch:qwen2.5_32b", "RRRoo"),
])  # fmt: skip
def test_every_megatron_recipe_at_every_node_count(recipe, expected, tmp_path, capsys, monkeypatch):
    """The Megatron recipes hand NNODES/TP/PP/VLLM_TP to run_megatron_grpo.sh (the *_ray.sh pin NNODES; the sbatch
    takes it from the allocation): their variables at 1, 2, 3, 4, 8 nodes through the real script. ``expected``:
    o = a launch that passes every check, R = refused in one line (by the script or by the launcher)."""
    file, _, arm = recipe.partition(":")
    values = _recipe_env((SCRIPTS / "megatron" / file).read_text(), arm or None)
    size = "14b" if "14b" in recipe else "32b"
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "q", "golden_answers": ["a"]}\n')
    _recorder(tmp_path, "openrlhf-search")
    outcomes = ""
    for nodes in NODE_COUNTS:
        env = {**os.environ, **values, "NNODES": str(nodes), "MODEL": str(_model_dir(tmp_path, size)),
               "TRAIN_FILES": str(train), "RETRIEVAL_URL": "http://10.0.0.1:8000", "DRY_RUN": "1",
               "OUTPUT_DIR": str(tmp_path / f"out{nodes}"), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
        env.pop("TRAIN_NODES", None)  # the scripts derive it from NNODES (NNODES / 2)
        result = _launch(SCRIPTS / "megatron" / "run_megatron_grpo.sh", [], env, tmp_path, capsys, monkeypatch)
        tp, pp = int(values["TP"]), int(values.get("PP", "1"))
        outcome = _outcome(result, nodes, size, strategy="megatron", megatron_tp=tp, megatron_pp=pp)
        outcomes += "o" if outcome == "ok" else "R"
    assert outcomes == expected


# ------------------------------------------------------------------------------------------ multi-node guards
def test_multi_node_guards_count_vllm_only_nodes_and_refuse_unreachable_retrievers():
    from openrlhf_search.integrations.openrlhf.plan import build_plan
    from openrlhf_search.trainer.config import load_config

    cfg = load_config(None, ["model.path=/models/qwen", "retriever.spec=http://127.0.0.1:8000",
                             "rollout.prompts_per_step=16"])  # fmt: skip
    # training on one node, vLLM on another (the Megatron recipes' layout): a 2-node run
    split = {"colocate_all": False, "vllm_enable_sleep": False, "actor_num_gpus_per_node": 8,
             "ref_num_gpus_per_node": 8, "vllm_num_engines": 4, "vllm_tensor_parallel_size": 2}  # fmt: skip
    cfg.algorithm.kl_coef = 0.0
    with pytest.raises(ValueError, match="a 2-node run needs openrlhf.shared_dir"):
        build_plan(cfg, split)
    with pytest.raises(ValueError, match="cannot reach a loopback address"):
        build_plan(cfg, {**split, "shared_dir": "/shared/run"})
    build_plan(cfg, {**split, "shared_dir": "/shared/run", "retrieval_url": "http://10.0.0.1:8000"})
    # the same GPUs on one 16-GPU node: one node, loopback fine
    build_plan(cfg, {**split, "cluster_gpus_per_node": 16})
    for bad in ({"retrieval_url": "http://0.0.0.0:8000"}, {"retrieval_url": "", "retrieval_host": "0.0.0.0"}):
        one = load_config(None, ["model.path=/m", "retriever.spec=/index", "rollout.prompts_per_step=16"])
        with pytest.raises(ValueError, match="0.0.0.0 is an address to listen on, not one to connect to"):
            build_plan(one, bad)


def test_vllm_host_ip_is_not_forwarded_to_other_nodes(monkeypatch):
    from openrlhf_search.integrations.openrlhf import entrypoint
    from openrlhf_search.integrations.openrlhf.cpu_shim import SWITCH_ENV as CPU_SHIM_ENV

    monkeypatch.setenv("VLLM_HOST_IP", "10.0.0.1")  # the head node's own address
    monkeypatch.delenv(CPU_SHIM_ENV, raising=False)
    monkeypatch.delenv("OPENRLHF_SEARCH_AGENT_CONFIG", raising=False)
    assert "VLLM_HOST_IP" not in entrypoint.runtime_env_vars()
    monkeypatch.setenv(CPU_SHIM_ENV, "1")  # one machine: loopback for every process
    assert entrypoint.runtime_env_vars()["VLLM_HOST_IP"] == "10.0.0.1"


def test_slurm_local_job_requests_a_gpu_and_a_cpu_fallback_says_so(capsys, monkeypatch):
    text = (SCRIPTS / "local" / "slurm_local_train.sbatch").read_text()
    assert re.search(r"^#SBATCH --(gpus|gres)=(gpu:)?\d", text, re.M)
    import torch

    from openrlhf_search.trainer.local import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", {"SLURM_JOB_ID": "42"}).type == "cpu"
    err = capsys.readouterr().err
    assert "no CUDA GPU in Slurm job 42" in err and "--gpus=1" in err
    assert resolve_device("auto", {}).type == "cpu" and capsys.readouterr().err == ""
    assert resolve_device("cpu", {"SLURM_JOB_ID": "42"}).type == "cpu" and capsys.readouterr().err == ""
