"""OpenRLHF's DeepSpeed actors under the strict device proxy (opt-in: needs OpenRLHF and DeepSpeed; ``pytest -k
strict``). The worker (``strict_deepspeed_worker.py``) is one Ray-like actor process (``CUDA_VISIBLE_DEVICES=3``,
``LOCAL_RANK=0``): OpenRLHF's ``DeepspeedStrategy.setup_distributed`` installs the proxy and the strict DeepSpeed
accelerator, then tiny DeepSpeed engines (ZeRO-0/2/3, bf16) get a planted host input (raises as on a GPU) and
correctly placed inputs (train), and OpenRLHF's own step normaliser, metric all-reduce and replay buffer run
without false positives. A subprocess, because the proxy is installed process-wide for good."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openrlhf")
pytest.importorskip("deepspeed")
pytestmark = pytest.mark.openrlhf

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def strict_actor(tmp_path_factory):
    out = tmp_path_factory.mktemp("strict_ds") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(HERE / "strict_deepspeed_worker.py"), str(out), str(_free_port())],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_strict_deepspeed_actor_is_installed_with_cuda_placements(strict_actor):
    r = strict_actor
    assert r["installed"] is True
    assert (r["current_device"], r["fake_gpu"], r["accelerator"]) == (0, 3, "cuda:0")  # Ray: visible cuda:0 = GPU 3
    assert r["replay_target"] == "cuda:0"  # OpenRLHF's own target, not the plain shim's CPU
    assert r["other_thread_accelerator"] == "cpu"  # a thread without the proxy never reaches real CUDA
    assert r["counters"]["checks"] > 100 and r["counters"]["redirects"] > 0


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_strict_deepspeed_engine_host_input_raises_placed_input_trains(strict_actor, stage):
    r = strict_actor
    assert r[f"z{stage}_param_device"] == "cuda:0"  # DeepSpeed's placement through the strict accelerator
    assert "Expected all tensors to be on the same device" in r[f"z{stage}_host_input"]
    assert "cuda:0 and cpu" in r[f"z{stage}_host_input"]
    steps = r[f"z{stage}_steps"]
    assert isinstance(steps, dict), steps  # no false positive in forward, ZeRO's backward hooks or the step
    assert steps["loss_device"] == "cuda:0"
    assert steps["losses"][-1] < steps["losses"][0]


def test_strict_openrlhf_step_normaliser_and_metrics_take_the_gpu_branch(strict_actor):
    """``_optimizer_step_loss_norm`` branches on ``torch.cuda.is_available()``: OpenRLHF's code sees True under the
    proxy (its GPU branch, all-reduced over the NCCL-like DP group); ``strategy.all_reduce`` moves host metrics to
    the GPU itself."""
    assert strict_actor["loss_norm"] == "cuda:0"
    assert strict_actor["strategy_all_reduce"] == "ok"
