"""A run that cannot learn says so, early, and still shows what the model did.

The in-process run uses ``examples/configs/smoke.yaml`` without its warm start and with DSPO: the random tiny model
never answers, every sample scores 0, DSPO's filter drops every group and no update happens.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from openrlhf_search.trainer.config import load_config
from openrlhf_search.trainer.diagnosis import PATIENCE, SignalMonitor, step_signal
from openrlhf_search.trainer.local import train
from openrlhf_search.trainer.logging import read_metrics, run_report


def _traj(group: int, answer: str | None = None, valid: bool = False):
    return SimpleNamespace(meta={"group_id": group, "reward_info": {"valid_format": valid}}, answer=answer)


def _step(rewards_by_group: list[list[float]], answered: bool = True):
    trajs, rewards = [], []
    for g, rs in enumerate(rewards_by_group):
        for r in rs:
            trajs.append(_traj(g, "x" if answered else None, valid=answered))
            rewards.append(r)
    return trajs, rewards


def test_step_signal_counts_flat_groups_answers_and_format():
    sig = step_signal(*_step([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5]]))
    assert (sig.flat_groups, sig.groups, sig.answered, sig.valid_format) == (2, 3, 1.0, 1.0)
    assert not sig.flat and step_signal(*_step([[0.2, 0.2], [0.0, 0.0]])).flat


@pytest.mark.parametrize("dynamic", [True, False])
def test_monitor_warns_once_after_patience_flat_steps_with_cause_and_advice(dynamic):
    mon = SignalMonitor("dspo" if dynamic else "grpo", dynamic_filter=dynamic)
    flat = _step([[0.0, 0.0], [0.0, 0.0]], answered=False)
    for step in range(1, PATIENCE):
        assert mon.update(step, *flat) is None
    warning = mon.update(PATIENCE, *flat)
    assert warning is not None and f"steps 1-{PATIENCE}" in warning
    assert "sft.steps" in warning and "model.path" in warning and "env.reward=format_f1" in warning
    formatted = SignalMonitor("grpo", dynamic_filter=False, reward="format_f1", patience=1)
    assert "env.reward=" not in formatted.update(1, *flat)  # the reward already credits the format
    assert ("algorithm.name=grpo" in warning) == dynamic  # GRPO is advice only where a filter drops groups
    assert ("no update happened" in warning) == dynamic
    assert mon.update(PATIENCE + 1, *flat) is None  # once
    assert mon.summary() == {"steps_without_signal": PATIENCE + 1, "steps": PATIENCE + 1, "warning": warning}


def test_monitor_streak_resets_on_a_step_with_signal_and_no_answer_counts_as_none():
    mon = SignalMonitor("grpo", dynamic_filter=False)
    flat, mixed = _step([[0.0, 0.0]]), _step([[1.0, 0.0]])
    for step in range(1, 3 * PATIENCE):
        assert mon.update(step, *(mixed if step % PATIENCE == 0 else flat)) is None
    assert mon.warning is None and mon.steps_without_signal == 3 * PATIENCE - 3
    mon = SignalMonitor("grpo", dynamic_filter=False)
    unanswered = _step([[0.1, 0.0], [0.0, 0.1]], answered=False)  # rewards vary, yet nothing ever answers
    warnings = [mon.update(step, *unanswered) for step in range(1, PATIENCE + 1)]
    assert warnings[:-1] == [None] * (PATIENCE - 1)
    assert warnings[-1] is not None and "no trajectory gave an accepted answer" in warnings[-1]


def test_constant_reward_run_warns_within_patience_and_still_writes_trajectories(tmp_path, capsys):
    out = tmp_path / "run"
    steps = PATIENCE + 1
    cfg = load_config("examples/configs/smoke.yaml", [
        f"logging.output_dir={out}", f"steps={steps}", "sft.steps=0", "algorithm.name=dspo",
        "logging.sample_every=1", "logging.rollout_every=1", "data.num_eval=0", "logging.save_every=0"])
    summary = train(cfg)
    printed = capsys.readouterr().out
    assert f"WARNING: no learning signal in steps 1-{PATIENCE}" in printed
    assert "no update happened" in printed and "sft.steps" in printed and "algorithm.name=grpo" in printed
    assert summary["learning_signal"]["warning"] and summary["learning_signal"]["steps_without_signal"] == steps
    assert "WARNING: this run could not learn" in run_report(summary, 1.0)

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert r["update/skipped_empty_batch"] == 1.0  # DSPO dropped everything: no update ...
        records = [json.loads(x) for x in (out / "rollouts" / f"step_{r['step']:06d}.jsonl").read_text().splitlines()]
        # ... and yet every sampled trajectory is on disk, and the step's statistics describe exactly those
        assert len(records) == r["filter/rounds"] * 2 * 3  # rounds x prompts_per_step x group_size of smoke.yaml
        assert r["answered_frac"] == pytest.approx(sum(x["answer"] is not None for x in records) / len(records))
        assert r["reward_mean"] == pytest.approx(sum(x["reward"] for x in records) / len(records))
        for key in ("searches_per_traj", "model_tokens", "response_len", "reward_flat_group_frac"):
            assert key in r, key
        assert (out / "samples" / f"step_{r['step']:06d}.txt").is_file()
