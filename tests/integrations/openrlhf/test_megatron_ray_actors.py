"""OpenRLHF 0.11.2's ``RayActorGroup`` drives the Megatron Ray actors at TP=2 (opt-in: needs the OpenRLHF venv with
megatron-core 0.16.1 + mbridge; ``scripts/test_openrlhf.sh`` runs it, where a missing piece is a failure). In the
extended set (``scripts/test_all.sh``'s ``openrlhf-extended`` layer): CI's default set drives the same actors through
OpenRLHF's real ``train_ppo_ray`` (``test_megatron_e2e.py``).

Moved here from ``tests/integrations/megatron/test_megatron_actor.py``, where it looked for the OpenRLHF venv at a
fixed path and skipped whenever that path was absent -- so it never ran. It now runs in the interpreter the opt-in
suite runs in (the OpenRLHF venv) and fails there when megatron-core or mbridge is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.openrlhf, pytest.mark.megatron, pytest.mark.slow, pytest.mark.extended,
              pytest.mark.timeout(900)]  # fmt: skip

pytest.importorskip("openrlhf")
pytest.importorskip("megatron.core", reason="megatron-core is not installed in the OpenRLHF venv")
pytest.importorskip("mbridge", reason="mbridge is not installed in the OpenRLHF venv")

WORKER = Path(__file__).resolve().parents[1] / "megatron" / "ray_actor_worker.py"


def test_megatron_ray_actors_driven_by_openrlhf_actor_groups(tmp_path):
    """``ray_actor_worker.py`` in a fresh process under the CPU shim: init, ``forward`` through
    ``async_run_method_batch`` with ``duplicate_actors = TP`` (both TP ranks get the batch and return identical
    results), ``append`` of a real OpenRLHF ``Experience``, ``fit``, ``save_model``, ``broadcast_to_vllm`` without
    engines; a reference group alongside (~90 s on 2 cores)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openrlhf_search.integrations.openrlhf.cpu_shim import cpu_shim_env

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, initializer_range=0.15,
                      tie_word_embeddings=True)  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen2")
    env = {**os.environ, **cpu_shim_env(), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "qwen2"), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "ray_report.json").read_text())
    assert report["policy_results"] == 2  # duplicate_actors: both TP ranks processed the same micro-batch
    assert report["policy_forward_diff"] < 1e-5 and report["reference_forward_diff"] < 1e-5
    first, second = report["fit_status"]
    assert first == second and first["actor_grad_norm"] > 0 and "policy_loss" in first
    assert report["forward_change_after_fit"] > 0.1
    assert report["saved_diff_vs_policy"] < 1e-5
    assert all(b["weight_sync_buckets"] >= 1 for b in report["broadcast"])
