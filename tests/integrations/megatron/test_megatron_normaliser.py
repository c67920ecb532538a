"""The loss normaliser on Megatron (gloo, CPU shim): DP=2 and any micro-batch size give the DP=1 gradient.

``normaliser_worker.py`` captures the finalised gradient of one ``engine.train_step`` for several loss configs
(every aggregation, KL/entropy/SAPO terms) on a batch of 8 sequences at DP=1 as 1, 2 and 4 micro-batches and at
DP=2 as 1 and 2 micro-batches per rank. Every gradient must equal the DP=1 single-micro-batch one (= the plain
loss on the whole batch); the planted mistake (a loss without a config, so no global normaliser: megatron's mean
of micro-batch means) must not. Two launches, ~40 s of CPU (2-3 min wall on a loaded 2-core machine): slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed")
pytest.importorskip("mbridge", reason="mbridge is not installed")

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

WORKER = str(Path(__file__).with_name("normaliser_worker.py"))


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_search.integrations.megatron.launch import run_local_ranks

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                 initializer_range=0.15)).save_pretrained(path)  # fmt: skip
    out = {}
    for world, sizes in ((1, "2,4,8"), (2, "2,4")):
        target = tmp_path_factory.mktemp(f"dp{world}")
        run_local_ranks(WORKER, world, ["--model", str(path), "--out", str(target), "--micro-batch-sizes", sizes],
                        timeout=300)  # fmt: skip
        out[world] = json.loads((target / "grads.json").read_text())
    return out


def _close(a, b, rtol=1e-4, atol=1e-6):
    import torch

    a, b = torch.tensor(a), torch.tensor(b)
    return torch.allclose(a, b, rtol=rtol, atol=atol * float(b.abs().max()))


def test_megatron_normaliser_dp2_and_micro_batches_match_dp1(grads):
    cases = [c for c in grads[1] if not c.startswith("planted")]
    assert len(cases) == 6
    for case in cases:
        ref = grads[1][case]["8"]
        assert max(abs(x) for x in ref["grad"]) > 1e-4, case  # the loss has a gradient
        for world, sizes in ((1, ("2", "4")), (2, ("2", "4"))):
            for mbs in sizes:
                got = grads[world][case][mbs]
                where = f"{case} DP={world} micro_batch_size={mbs}"
                assert _close(got["grad"], ref["grad"]), where
                assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), where


def test_megatron_normaliser_planted_mean_of_micro_batch_means_differs(grads):
    planted = grads[1]["planted_no_normaliser"]
    assert not _close(planted["2"]["grad"], planted["8"]["grad"])
    assert not _close(grads[2]["planted_no_normaliser"]["4"]["grad"], planted["8"]["grad"])
