"""Issue 24: what a stopped run says is true of its directory.

Ctrl-C during the warm start said "rerun with --resume", and `--resume` then said there was no checkpoint; a second
SIGTERM during RL step 3 said "no checkpoint written (before RL)". Each message now names what the run was doing and
offers `--resume` only when a checkpoint exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from openrlhf_search.trainer.preemption import Preempted, PreemptionGuard

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "examples" / "configs" / "smoke.yaml")


def _env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    return env


def _train(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "openrlhf_search", "train", "--config", SMOKE, *extra, f"logging.output_dir={out}"]


def _has_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob("step_*/trainer_state.pt"))


def _stop(proc: subprocess.Popen, ready, sig, again: float | None = None, timeout: float = 180) -> tuple[int, str]:
    """Send ``sig`` once ``ready(stderr so far)`` (and a second one ``again`` seconds later); the exit code and the
    whole stderr."""
    err: list[str] = []
    fd = proc.stderr.fileno()  # raw reads: a progress bar redraws with "\r", not "\n"
    reader = threading.Thread(target=lambda: err.extend(c.decode(errors="replace") for c in iter(
        lambda: os.read(fd, 4096), b"")), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    try:
        while not ready("".join(err)):
            if proc.poll() is not None:
                reader.join(5)
                pytest.fail(f"the run ended before the signal: {''.join(err)[-3000:]}")
            if time.time() > deadline:
                pytest.fail("the run never reached the point to signal")
            time.sleep(0.05)
        proc.send_signal(sig)
        if again is not None:
            time.sleep(again)
            if proc.poll() is None:
                proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    return rc, "".join(err)


def test_ctrl_c_during_the_warm_start_says_what_to_run_and_that_works(tmp_path):
    """Reproduced by: Ctrl-C during the quickstart's warm start ("rerun with --resume"; then --resume: exit 2,
    "no checkpoint")."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(out, "sft.steps=100000", "steps=2", "logging.progress=true"), env=_env(),
                            cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the warm start's progress bar is drawn when it starts (here it would run for hours)
    rc, err = _stop(proc, lambda text: "warm start" in text, signal.SIGINT)
    assert rc == 75, err[-3000:]
    assert "Traceback" not in err
    assert not _has_checkpoint(out)
    assert "during the warm start" in err and "nothing to resume" in err, err[-2000:]
    assert "--resume to continue" not in err, err[-2000:]  # there is nothing to continue
    assert "--overwrite" in err
    res = subprocess.run(_train(out, "--overwrite", "sft.steps=2", "steps=1"), env=_env(), cwd=str(REPO),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]  # what the message said to run works


@pytest.mark.parametrize("save_every", [0, 1])
def test_a_second_sigterm_during_rl_says_the_step_and_the_truth_about_checkpoints(tmp_path, save_every):
    """Reproduced by: SIGTERM (twice: the step took minutes) after two RL steps: "no checkpoint written (before RL);
    rerun with --resume"."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(out, "steps=400", f"logging.save_every={save_every}", "sft.steps=2"), env=_env(),
                            cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    rc, err = _stop(proc, lambda _: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2,
                    signal.SIGTERM, again=0.01)
    assert rc == 75, err[-3000:]
    assert "before RL" not in err and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    if _has_checkpoint(out):  # --resume is offered exactly when it can work
        assert "rerun with --resume" in last and "nothing to resume" not in last, last
        res = subprocess.run(_train(out, "--resume", "steps=4", "sft.steps=2"), env=_env(), cwd=str(REPO),
                             capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        assert "nothing to resume" in last and "--resume to continue" not in last, last
    if "at once" in last:  # the second signal came during a step: it says which
        assert "during RL step" in last, last


def test_preempted_messages_say_what_is_true():
    with PreemptionGuard() as guard:
        guard.phase = "the warm start"
        with pytest.raises(Preempted) as exc:
            os.kill(os.getpid(), signal.SIGINT)  # not deferred: stops at once
    msg = str(exc.value)
    assert "during the warm start" in msg and "nothing to resume" in msg and "--resume to continue" not in msg
    with PreemptionGuard() as guard:
        guard.deferred, guard.phase = True, "RL step 3"
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Preempted) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
    msg = str(exc.value)
    assert msg.startswith("SIGTERM received again: stopped at once during RL step 3, without saving")
    assert "before RL" not in msg and "nothing to resume" in msg
    with PreemptionGuard() as guard:
        guard.deferred, guard.phase, guard.saved = True, "RL step 3", ("ck/step_000002", 2)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Preempted) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
    msg = str(exc.value)
    assert "the newest checkpoint is ck/step_000002 (step 2); rerun with --resume to continue" in msg
    assert str(Preempted("SIGTERM", "ck/step_000004", 4)).endswith(
        "stopped at a safe point; checkpoint ck/step_000004 (step 4); rerun with --resume to continue")
