"""The strict device proxy on two real gloo ranks with megatron's groups: planted mistakes fail, fixes pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def strict_results(tmp_path_factory, monkeypatch_module):
    from openrlhf_search.integrations.megatron.launch import run_local_ranks

    out = tmp_path_factory.mktemp("strict")
    monkeypatch_module.setenv("OPENRLHF_SEARCH_STRICT_DEVICES", "1")
    run_local_ranks(str(Path(__file__).with_name("strict_worker.py")), 2, [str(out)], timeout=180)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_strict_cpu_tensor_on_pipeline_group_raises(strict_results):
    for rank, r in enumerate(strict_results):
        assert r["fake_gpu"] == f"cuda:{rank}"  # LOCAL_RANK
        assert "No backend type associated with device type cpu" in r["pp_broadcast_cpu"], r
        assert r["pp_broadcast_gpu"] == "ok"


def test_strict_cpu_metrics_all_reduce_over_nccl_raises(strict_results):
    for r in strict_results:
        assert "torch.distributed.all_reduce of a CPU tensor" in r["metrics_cpu"], r
        assert r["metrics_gpu"] == "ok"
        assert r["gloo_group_cpu"] == "ok"  # explicit gloo groups take CPU tensors, on GPUs too


def test_strict_colocated_nccl_group_raises(strict_results):
    for r in strict_results:
        assert "Duplicate GPU detected: rank 1 and rank 0 both on CUDA device 0" in r["colocated_nccl_group"], r
        assert r["separate_nccl_group"] == "ok"
