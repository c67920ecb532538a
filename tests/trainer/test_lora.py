"""LoRA in the local trainer: only adapter weights train, merged export is exact, checkpoints save and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="LoRA needs peft (in the test extra)")

import torch  # noqa: E402

from openrlhf_search.trainer import lora  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _tiny():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def test_only_adapter_weights_change_and_the_merged_export_is_exact():
    model = lora.apply_lora(_tiny(), rank=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    before = {k: v.clone() for k, v in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 97, (2, 12))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 97),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)  # the base never moves
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter really learned something

    merged = lora.merged_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = _tiny()
    plain.load_state_dict(merged, strict=False)
    plain.tie_weights()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = plain(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # out of place: exporting did not perturb the trained module
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), [v for v in model.parameters()]))


def _cli(*args, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "openrlhf_search", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


def test_lora_run_checkpoints_merged_model_plus_adapter_and_resumes(tmp_path):
    out = tmp_path / "run"
    smoke = str(REPO / "examples" / "configs" / "smoke.yaml")
    common = ["--config", smoke, f"logging.output_dir={out}", "model.lora_rank=4", "logging.progress=false"]
    res = _cli("train", *common, "steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = Path(json.loads((out / "summary.json").read_text())["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "lora_base" / "model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["params"]["params/trainable"] < 0.5 * summary["params"]["params/total"]

    # the checkpoint's merged weights are exactly base + adapter
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(ckpt))
    lora.load_base(base, out)
    wrapped = lora.apply_lora(base, 4, 16, 0.0, ["all-linear"])
    lora.load_adapter(wrapped, ckpt / "adapter")
    merged = lora.merged_state_dict(wrapped)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved.keys() <= merged.keys()
    assert all(torch.equal(saved[k], merged[k]) for k in saved)

    res = _cli("train", *common, "steps=3", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
