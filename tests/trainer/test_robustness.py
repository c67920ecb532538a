"""Issue 16: preemption, run directories, divergence, corrupt checkpoints, torn metrics, eval = the run's environment.

The subprocess tests share one reference smoke run (``examples/configs/smoke.yaml``, 3 steps, session fixture);
each test names the command that reproduced the problem.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "examples" / "configs" / "smoke.yaml")
STEPS = 3


def _env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    return env


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "openrlhf_search", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=str(REPO))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", SMOKE, f"logging.output_dir={out}", f"steps={STEPS}", "logging.save_every=0",
            *extra]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted smoke run (3 steps, only the final checkpoint)."""
    out = tmp_path_factory.mktemp("robust") / "ref"
    res = _cli(*_train_args(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------------ run directories
def test_fresh_start_into_a_finished_run_is_refused_before_any_work(reference_run):
    """Reproduced by: running the same `train` command twice (metrics.jsonl was truncated, summaries replaced)."""
    before = (reference_run / "metrics.jsonl").read_text()
    t0 = time.time()
    res = _cli(*_train_args(reference_run))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "is not empty" in res.stderr and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert "Traceback" not in res.stderr
    assert time.time() - t0 < 60
    assert (reference_run / "metrics.jsonl").read_text() == before


def test_resume_of_a_misspelled_directory_says_so(tmp_path):
    """Reproduced by: `train --resume logging.output_dir=<typo>` (it started fresh with no message)."""
    res = _cli(*_train_args(tmp_path / "typo"), "--resume")
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "--resume-or-start" in res.stderr
    assert not (tmp_path / "typo").exists()


def test_run_dir_modes(tmp_path):
    from openrlhf_search.trainer.rundir import RunDirError, prepare_run_dir

    out = tmp_path / "run"

    def has(d):
        return (d / "checkpoints" / "step_000001").is_dir()

    assert prepare_run_dir(out, "fresh", has) is False  # missing directory: fine
    (out / "data").mkdir(parents=True)
    (out / "config.yaml").write_text("steps: 1\n")
    assert prepare_run_dir(out, "fresh", has) is False  # a start that failed during set-up does not count
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        prepare_run_dir(out, "fresh", has)
    with pytest.raises(RunDirError, match="no checkpoint"):
        prepare_run_dir(out, "resume", has)
    assert prepare_run_dir(out, "resume_or_start", has) is False  # no checkpoint: cleared, fresh
    assert not (out / "metrics.jsonl").exists() and (out / "notes.txt").read_text() == "mine"
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    assert prepare_run_dir(out, "resume_or_start", has) is True
    assert prepare_run_dir(out, "overwrite", has) is False
    assert not (out / "checkpoints").exists() and (out / "notes.txt").exists()


# ------------------------------------------------------------------------------------------------ preemption
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(tmp_path, reference_run):
    """Reproduced by: `kill -TERM <train pid>` (what Slurm sends): the run died with nothing saved."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "openrlhf_search", *_train_args(out, "--resume-or-start")],
                            env=_env(), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    try:
        while time.time() < deadline:  # signal once step 1 is logged: during step 2 at the latest
            if metrics.exists() and metrics.read_text().strip():
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended before the signal: {proc.stderr.read()[-3000:]}")
            time.sleep(0.1)
        else:
            pytest.fail("run did not reach step 1 in time")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)  # bounded: the rest of one step plus a checkpoint
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 75, err[-3000:]
    assert "SIGTERM" in err and "Traceback" not in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    saved_step = int(latest.split("_")[1])
    assert 1 <= saved_step < STEPS
    assert [r["step"] for r in _rows(metrics)] == list(range(1, saved_step + 1))

    res = _cli(*_train_args(out, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at step {saved_step}" in res.stdout
    ref, got = _rows(reference_run / "metrics.jsonl"), _rows(metrics)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):  # the same questions, rewards and losses as the uninterrupted run
        assert a["samples"] == b["samples"]
        for k, v in a.items():
            if isinstance(v, float) and not k.startswith(("time/", "memory/")) and k != "lr":  # measurements
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    wa = load_file(str(reference_run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    wb = load_file(str(out / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_preemption_guard_defers_then_forces():
    from openrlhf_search.trainer.preemption import Preempted, PreemptionGuard

    with PreemptionGuard() as guard:
        guard.deferred = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested == "SIGTERM"  # deferred: the loop saves at the end of the step
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal stops at once
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


# ------------------------------------------------------------------------------------------------ divergence
def test_lr_inf_never_saves_nonfinite_weights(tmp_path):
    """Reproduced by: `train ... optimizer.lr=inf` (exit 0 with a checkpoint of 100% NaN weights)."""
    out = tmp_path / "run"
    # `optimizer.lr=inf` is now refused up front (exit 2, tests/trainer/test_validation_cli.py); the guard behind it is
    # still tested with that config by switching the validation off in the CLI process
    driver = ("import sys, openrlhf_search.trainer.validate as v; v.validate_config = lambda *a, **k: []; "
              "from openrlhf_search.cli import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", driver, "train", "--config", SMOKE, f"logging.output_dir={out}",
                          "steps=2", "optimizer.lr=inf", "sft.steps=0", "data.num_eval=1"], capture_output=True,
                         text=True, timeout=240, env=_env(), cwd=str(REPO))  # fmt: skip
    assert res.returncode == 4, res.stderr[-3000:]
    assert "non-finite parameters" in res.stderr and "Traceback" not in res.stderr
    assert not list((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else True


@pytest.mark.slow
def test_consecutive_skipped_updates_stop_the_run(tmp_path, monkeypatch):
    """Reproduced by: the quickstart with `optimizer.lr=1e6` (every update skipped from step 2, exit 0). Here every
    update is made non-finite; the run stops after max_skipped_steps and keeps the last good checkpoint."""
    import openrlhf_search.trainer.local as local
    from openrlhf_search.trainer.config import load_config
    from openrlhf_search.trainer.preemption import Diverged

    real = local.update_policy
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] >= 2:  # from step 2 on, as with lr=1e6
            out["update/grad_norm"] = float("nan")
            out["update/skipped_nonfinite"] = 2.0
        return out

    monkeypatch.setattr(local, "update_policy", flaky)
    out = tmp_path / "run"
    cfg = load_config(SMOKE, [f"logging.output_dir={out}", "steps=8", "logging.save_every=1",
                              "optimizer.max_skipped_steps=2", "sft.steps=0", "data.num_eval=1"])
    with pytest.raises(Diverged, match="max_skipped_steps=2"):
        local.train(cfg)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def tiny_model():
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2

    tok = build_tiny_tokenizer(["Zorvan Kelt was born in Mirabel in 1971."] * 50, vocab_size=300)
    return build_tiny_qwen2(tok, TinyModelSpec(16, 1, 2, 1, 32)), tok


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer_state.pt"])
def test_corrupt_latest_checkpoint_falls_back_naming_both(tmp_path, tiny_model, victim):
    """Reproduced by: truncating the latest checkpoint's safetensors or trainer-state file, then `--resume`
    (a traceback that did not name the checkpoint)."""
    from openrlhf_search.trainer.checkpoint import CheckpointError, find_resume_checkpoint, save_checkpoint

    model, tok = tiny_model
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(root, step, model, tok, {"step": step, "blob": list(range(1000))})
    f = root / "step_000002" / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msgs = []
    ckpt, state = find_resume_checkpoint(root, log=msgs.append)
    assert ckpt.name == "step_000001" and state["step"] == 1
    assert "step_000002" in msgs[0] and "step_000001" in msgs[0] and victim in msgs[0]
    f1 = root / "step_000001" / victim
    f1.write_bytes(f1.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="step_000001.*step_000002|step_000002.*step_000001"):
        find_resume_checkpoint(root, log=msgs.append)


def test_save_refuses_nonfinite_weights(tmp_path, tiny_model):
    import torch

    from openrlhf_search.trainer.checkpoint import save_checkpoint
    from openrlhf_search.trainer.preemption import Diverged

    model, tok = tiny_model
    save_checkpoint(tmp_path, 1, model, tok, {"step": 1})
    p = next(model.parameters())
    old = p.detach().clone()
    with torch.no_grad():
        p[0, 0] = float("nan")
    try:
        with pytest.raises(Diverged, match="last good checkpoint: .*step_000001"):
            save_checkpoint(tmp_path, 2, model, tok, {"step": 2})
    finally:
        with torch.no_grad():
            p.copy_(old)
    assert not (tmp_path / "step_000002").exists()


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    """Reproduced by: a full disk during a metrics write, then `--resume` (json.loads failed on every resume)."""
    from openrlhf_search.trainer.logging import MetricsLogger, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "r": 0.5}\n{"step": 2, "r": 0.6}\n{"step": 3, "r"')
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=2)
    logger.log(3, {"r": 0.7})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert all(json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------------------------------ eval
def test_eval_of_a_run_checkpoint_reproduces_the_trainers_final_heldout_rollouts(tmp_path, reference_run):
    """Reproduced by: `eval --model runs/quickstart/checkpoints/step_N` (another tokenizer, the default template
    and budgets: F1 0.016 or 0.167 instead of the trainer's 0.370)."""
    summary = json.loads((reference_run / "summary.json").read_text())
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "run_config.yaml").is_file()
    res = _cli("eval", "--model", str(ckpt), "--data", str(reference_run / "data" / "test.jsonl"),
               "--max-samples", str(summary["eval_after"]["n"]), "--retriever", str(reference_run / "index"),
               "--output-dir", str(tmp_path / "eval"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "template=search_r1_compact" in res.stdout
    got = json.loads((tmp_path / "eval" / "results.json").read_text())["datasets"][0]
    for k in ("n", "em", "subem", "f1", "turns", "searches", "answered"):
        assert got[k] == pytest.approx(summary["eval_after"][k]), k
    # stronger than the (near-zero) scores of a random model: the same text, turn by turn, for every question
    mine = [json.loads(ln) for ln in (tmp_path / "eval" / "rollouts.jsonl").read_text().splitlines()]
    theirs = [json.loads(ln) for ln in (reference_run / "eval_after_rollouts.jsonl").read_text().splitlines()]
    assert [r["turns"] for r in mine] == [r["turns"] for r in theirs]
    assert [r["response_length"] for r in mine] == [r["response_length"] for r in theirs]


def test_eval_with_the_retriever_down_fails_before_the_first_question(tmp_path, reference_run):
    """Reproduced by: `eval --retriever http://127.0.0.1:<closed>` with a model that never searches (exit 0, F1 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    summary = json.loads((reference_run / "summary.json").read_text())
    res = _cli("eval", "--model", summary["checkpoint"], "--data", str(reference_run / "data" / "test.jsonl"),
               "--retriever", f"http://127.0.0.1:{port}", "--output-dir", str(tmp_path / "eval"), timeout=120)
    assert res.returncode == 3, (res.stdout[-2000:], res.stderr[-2000:])
    assert f"127.0.0.1:{port}" in res.stderr and "not answering" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "eval" / "results.json").exists()


def test_nan_guard_helper():
    import torch

    from openrlhf_search.trainer.preemption import SkipMonitor, nonfinite_parameters

    m = torch.nn.Linear(2, 2)
    assert nonfinite_parameters(m) == []
    with torch.no_grad():
        m.bias[0] = math.inf
    assert nonfinite_parameters(m) == ["bias"]
    mon = SkipMonitor(2)
    mon.update(1, True, None)
    mon.update(2, False, None)
    mon.update(3, True, None)
    with pytest.raises(Exception, match="diverged"):
        mon.update(4, True, "ck")


def test_slurm_script_forwards_sigterm_and_requeues(tmp_path):
    """examples/scripts/local/slurm_local_train.sbatch: SIGTERM to the batch shell reaches the trainer, whose exit 75
    makes the script requeue the job (a fake trainer and a fake scontrol stand in for the real ones)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "openrlhf-search").write_text(
        "#!/bin/bash\necho \"$@\" > \"$LOG.args\"\ntrap 'echo got-term >> \"$LOG\"; exit 75' TERM\n"
        "touch \"$LOG.ready\"\nfor _ in $(seq 600); do sleep 0.1; done\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho \"scontrol $*\" >> \"$LOG\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log), SLURM_JOB_ID="123")
    script = REPO / "examples" / "scripts" / "local" / "slurm_local_train.sbatch"
    proc = subprocess.Popen(["bash", str(script), "cfg.yaml", "steps=5"], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not Path(f"{log}.ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 75, out
    assert Path(f"{log}.args").read_text().split() == ["train", "--config", "cfg.yaml", "steps=5", "--resume-or-start"]
    assert log.read_text().splitlines() == ["got-term", "scontrol requeue 123"]


def test_quickstart_into_an_existing_run_is_refused(reference_run):
    """Reproduced by: running `openrlhf-search quickstart` twice (the second run replaced the first one's outputs)."""
    res = _cli("quickstart", "--output-dir", str(reference_run), timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "is not empty" in res.stderr and "--overwrite" in res.stderr and "Traceback" not in res.stderr
