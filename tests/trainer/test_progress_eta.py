"""Issue 24: the RL bar's ETA counted to `steps` (hours) while the time budget (`max_step_seconds`) ended the run in
minutes. The ETA shown is now the earlier of the two ends, and says which."""

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
