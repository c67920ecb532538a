"""The local trainer on a (logical) GPU under the strict device proxy: HF-engine rollouts at temperature 1, the
update and the evaluation, in-process on CPU storage with the GPU world's placement and generator rules.

``pytest -k strict`` selects these with the proxy's other planted-mistake tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openrlhf_search.integrations import strict_devices as sd
from openrlhf_search.integrations.strict_devices import strict_devices
from openrlhf_search.rollout import hf
from openrlhf_search.trainer.config import load_config
from openrlhf_search.trainer.local import train

SMOKE = str(Path(__file__).resolve().parents[2] / "examples" / "configs" / "smoke.yaml")


def _config(out: Path):
    return load_config(SMOKE, ["device=cuda", "steps=1", f"logging.output_dir={out}", "logging.save_every=0",
                               "rollout.temperature=1.0", "sft.steps=1"])  # fmt: skip


def test_strict_local_trainer_on_a_logical_gpu(tmp_path, monkeypatch):
    engines = []
    original = hf.HFEngine.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(hf.HFEngine, "__init__", record)
    with strict_devices() as mode:
        checks = type(mode).checks
        summary = train(_config(tmp_path / "run"))
        assert type(mode).checks > checks and type(mode).redirects > 0
    assert summary["steps_done"] == 1 and summary["eval_after"]["n"] > 0
    assert engines and all(sd.generator_device(e.generator) == 0 for e in engines)  # the sampler is on the GPU


def test_strict_local_trainer_refuses_a_host_sampler(tmp_path, monkeypatch):
    """Planted: the HF engine's sampler on the CPU (the defect torch raises at the first sampled token on a GPU)."""
    original = hf.HFEngine.__init__

    def cpu_sampler(self, model, tokenizer, max_batch_size=64, seed=0):
        original(self, model, tokenizer, max_batch_size, seed)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    monkeypatch.setattr(hf.HFEngine, "__init__", cpu_sampler)
    monkeypatch.setattr(hf.HFEngine, "update_weights", lambda self, model: setattr(self, "model", model))
    with strict_devices(), pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
        train(_config(tmp_path / "run"))
