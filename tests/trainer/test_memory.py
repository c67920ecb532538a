"""Memory is flat after the first steps: nothing a step allocates outlives it.

An in-process GRPO run of the tiny model records, after every step (when the trainer logs it), the number and bytes
of the tensors the Python side keeps alive and the process's resident set. After the first steps (optimizer state,
lazily built caches) all three must stop growing: a list of tensors kept across steps, a retained autograd graph or a
cache of rollouts would add to them at every step.
"""

from __future__ import annotations

import gc
import statistics
import sys

import torch

from openrlhf_search.trainer import local
from openrlhf_search.trainer.config import load_config
from openrlhf_search.trainer.logging import MetricsLogger
from openrlhf_search.trainer.memory import live_tensor_bytes, memory_metrics, release_freed_memory, rss_bytes

SETTLE = 3
"""Steps after which the memory must be flat."""


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_memory_helpers_report_this_process():
    assert rss_bytes() > 10 * 1024**2
    m = memory_metrics()
    assert m["memory/peak_rss_gb"] > 0.01 and m["memory/rss_gb"] > 0.01
    keep = torch.zeros(1024, 1024)  # 4 MiB that stay alive while measured
    assert live_tensor_bytes() >= keep.numel() * 4
    if sys.platform.startswith("linux"):
        assert release_freed_memory() in (True, False)  # glibc: True; musl: unsupported, never an error


def test_tensors_and_resident_memory_are_flat_after_the_first_steps(tmp_path, monkeypatch):
    steps = SETTLE + 5
    cfg = load_config("examples/configs/smoke.yaml", [
        f"logging.output_dir={tmp_path / 'run'}", f"steps={steps}", "sft.steps=0", "algorithm.name=grpo",
        "data.num_eval=0", "logging.save_every=0", "logging.sample_every=1", "logging.rollout_every=1",
        "rollout.temperature=1.5"])
    seen: list[tuple[int, int, float]] = []
    log = MetricsLogger.log

    def measuring_log(self, step, metrics, histograms=None):
        gc.collect()
        seen.append((_live_tensors(), live_tensor_bytes(), metrics["memory/rss_gb"] * 1024))
        return log(self, step, metrics, histograms)

    monkeypatch.setattr(MetricsLogger, "log", measuring_log)
    local.train(cfg)
    assert len(seen) == steps
    counts, nbytes, rss = zip(*seen[SETTLE - 1:])
    print("live tensors", counts, "\nlive bytes", nbytes, "\nrss MB", [round(r) for r in rss])
    assert max(counts) - min(counts) <= 2, counts  # no tensor accumulates across steps
    assert max(nbytes) - min(nbytes) < 1024**2, nbytes  # the step's own tensors vary with lengths only
    # the resident set: robust to allocator noise, the median of the last steps against that of the first ones
    assert statistics.median(rss[-3:]) - statistics.median(rss[:3]) < 24, rss
