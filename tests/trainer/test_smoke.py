"""Subprocess smoke runs of the CLI with tiny budgets: train, resume after SIGKILL, retriever down, eval.

Each run uses ``examples/configs/smoke.yaml`` (a 2-layer, 64-wide model, a few steps).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "examples" / "configs" / "smoke.yaml")


def _env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _cli(*args, timeout=180, **kw):
    return subprocess.run([sys.executable, "-m", "openrlhf_search", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=str(REPO), **kw)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_smoke_writes_metrics_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    res = _cli("train", "--config", SMOKE, f"logging.output_dir={out}", "steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert isinstance(r["reward_mean"], float)
        for key in ("time/generation", "time/retrieval", "time/update", "time/other", "turns_per_traj",
                    "searches_per_traj", "response_len"):
            assert key in r, key
    summary = json.loads((out / "summary.json").read_text())
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    assert (out / "reward_curve.png").stat().st_size > 0
    assert list((out / "samples").glob("step_*.txt"))
    # the terminal ends with the human summary and its paths, not a JSON dict
    assert f"checkpoint:  {summary['checkpoint']}" in res.stdout and f"metrics:     {out}" in res.stdout
    assert "training finished in" in res.stdout and '"eval_after": {' not in res.stdout


def _kill_after_step(args: list[str], env: dict, metrics: Path, step: int, timeout: float = 150) -> None:
    """Start ``openrlhf-search *args`` and SIGKILL it as soon as ``metrics`` logs ``step`` (fails if it ends first)."""
    proc = subprocess.Popen([sys.executable, "-m", "openrlhf_search", *args], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if metrics.exists() and any(r["step"] >= step for r in _rows(metrics)):
                return
            if proc.poll() is not None:
                pytest.fail(f"run ended before it could be killed: {proc.stderr.read()[-3000:]}")
            time.sleep(0.1)
        pytest.fail(f"run did not reach step {step} in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _stream_prefix(out: Path) -> list[str]:
    """The order in which the run's question stream hands out training questions (from the saved data)."""
    from openrlhf_search.data.formats import read_dataset
    from openrlhf_search.trainer.data import QuestionStream

    train = read_dataset(out / "data" / "train.jsonl")[:40]  # data.num_train of smoke.yaml
    return [s.id for s in QuestionStream(train, seed=0).take(10_000)]


def test_resume_after_sigkill_reaches_same_step_count_without_repeating_data(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"logging.output_dir={out}", "steps=5"]
    metrics = out / "metrics.jsonl"
    _kill_after_step(args, _env(), metrics, 2)  # step 2's checkpoint may or may not exist
    assert (out / "checkpoints" / "latest").is_file()
    res = _cli("train", "--config", SMOKE, f"logging.output_dir={out}", "steps=5", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    rows = _rows(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # every step exactly once
    used = [q for r in rows for q in r["samples"]]
    assert used == _stream_prefix(out)[: len(used)]  # the stream continued exactly: nothing lost or repeated


LEN_PARITY_PLUGIN = '''
from openrlhf_search.rewards import register_reward


@register_reward("test_len_parity")
def _factory(**cfg):
    """A reward with variance on an untrained model (response length parity): advantages are non-zero, so the
    policy really changes every step and a stale batch's behaviour log-probs differ from the trainer's."""
    def fn(response_text, golden_answers, retrieved_text="", *, answer):
        return float(len(response_text) % 2), {"answer": answer, "em": 0.0, "subem": 0.0, "f1": 0.0,
                                               "valid_format": True, "format_error": "", "retrieval_hit": False}
    return fn
'''


def plugin_env(tmp_path: Path) -> dict:
    """The subprocess environment with ``test_len_parity_plugin`` importable (config ``plugins=[...]``)."""
    (tmp_path / "test_len_parity_plugin.py").write_text(LEN_PARITY_PLUGIN)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_async_producer_stays_within_its_bound_and_resumes_after_sigkill_losing_and_repeating_nothing(tmp_path):
    """rollout.async_producer: every logged batch within max_staleness, stale batches sampled by older weights;
    SIGKILL, then --resume: every step once, no question twice, and the only questions never trained on are the ones
    still in flight when the run ended."""
    out = tmp_path / "run"
    args = ["train", "--config", SMOKE, f"logging.output_dir={out}", "steps=6", "rollout.async_producer=true",
            "rollout.max_staleness=1", "algorithm.name=grpo+tis", "sft.steps=0", "plugins=[test_len_parity_plugin]",
            "env.reward=test_len_parity"]
    env = plugin_env(tmp_path)
    metrics = out / "metrics.jsonl"
    _kill_after_step(args, env, metrics, 3)
    res = subprocess.run([sys.executable, "-m", "openrlhf_search", *args, "--resume"], capture_output=True, text=True,
                         timeout=180, env=env, cwd=str(REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    rows = _rows(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["rollout/staleness_max"] <= 1 and r["rollout/token_staleness_max"] <= 1
        assert 0.0 <= r["async/learner_idle_share"] <= 1.0 and r["async/rollout_idle_s"] >= 0.0
        assert "offpolicy/staleness_mean" in r  # +tis received the token versions
    assert sum(r["update/grad_norm"] > 0 for r in rows) >= 3  # the policy really changed
    assert rows[0]["rollout/engine_logprob_gap"] < 1e-4  # version 0: the engine's copy = the trainer's weights
    # a batch sampled entirely one version ago, after an update that moved the weights: behaviour != proximal
    stale = [j for j in range(1, len(rows)) if rows[j]["rollout/token_staleness_mean"] == 1.0
             and rows[j - 1]["update/grad_norm"] > 0]
    assert stale and all(rows[j]["rollout/engine_logprob_gap"] > 1e-4 for j in stale), [
        (r["rollout/token_staleness_mean"], r["update/grad_norm"], r["rollout/engine_logprob_gap"]) for r in rows]
    used = [q for r in rows for q in r["samples"]]
    assert len(used) == len(set(used)) == 6 * 2  # prompts_per_step 2, grpo keeps every group
    order = _stream_prefix(out)
    last = max(order.index(q) for q in used)
    skipped = [q for q in order[:last] if q not in used]
    # open groups at the end (at most (max_staleness + 1) x prompts_per_step) may have been skipped, nothing else
    assert len(skipped) <= 4, skipped


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block exits


def test_retriever_down_fails_fast_with_a_clear_message(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.time()
    res = _cli("train", "--config", SMOKE, f"logging.output_dir={tmp_path / 'run'}", f"retriever.spec={url}",
               "sft.steps=0", timeout=120)
    assert res.returncode == 3, (res.stdout[-2000:], res.stderr[-3000:])
    assert "retriever" in res.stderr and url in res.stderr
    assert "Traceback" not in res.stderr
    assert time.time() - t0 < 90


def test_eval_on_a_tiny_dataset_writes_the_table(tmp_path):
    from openrlhf_search.data.formats import write_dataset
    from openrlhf_search.data.synthetic import generate_kb, write_kb
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.retrieval.bm25 import BM25Config, BM25Index
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2

    kb = generate_kb(seed=0, n_entities=24)
    write_kb(kb, tmp_path / "kb")
    BM25Index.build(tmp_path / "kb" / "corpus.jsonl", tmp_path / "index", config=BM25Config(), show_progress=False)
    tok = build_tiny_tokenizer([d.contents for d in kb.corpus], vocab_size=400)
    model = build_tiny_qwen2(tok, TinyModelSpec(32, 1, 2, 1, 64))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "flashrag" / "bamboogle").mkdir(parents=True)
    write_dataset(kb.test[:3], tmp_path / "flashrag" / "bamboogle" / "test.jsonl")
    write_dataset(kb.test[3:5], tmp_path / "mine.jsonl")
    res = _cli("eval", "--model", str(tmp_path / "model"), "--data", "bamboogle", str(tmp_path / "mine.jsonl"),
               "--data-dir", str(tmp_path / "flashrag"), "--retriever", str(tmp_path / "index"),
               "--output-dir", str(tmp_path / "eval"), "--max-turns", "2", "--max-tokens-per-turn", "8")
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| bamboogle | 3 |" in table and "| mine | 2 |" in table and "| average | 5 |" in table
    payload = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [d["dataset"] for d in payload["datasets"]] == ["bamboogle", "mine"]
    assert {"em", "subem", "f1", "turns", "searches"} <= set(payload["average"])


def test_eval_unknown_dataset_name_is_a_clear_error(tmp_path):
    res = _cli("eval", "--model", str(tmp_path), "--data", "nq", "--retriever", str(tmp_path))
    assert res.returncode == 2
    assert "'nq' is a Search-R1 dataset name" in res.stderr


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/")) and k != "wall_time"} for r in rows]


@pytest.mark.slow
def test_max_staleness_zero_is_the_synchronous_loop_and_one_trains_on_stale_batches(tmp_path):
    """Same seed: ``rollout.max_staleness=0`` gives the default run's metrics exactly; 1 trains on stale batches.

    The untrained tiny policy earns reward 0 everywhere (zero advantages), so the stale run adds weight decay to make
    every update move the weights: the behaviour log-probs of a stale batch must then differ from the trainer's.
    """
    runs = {}
    stale = ["rollout.max_staleness=1", "algorithm.name=grpo+tis", "optimizer.weight_decay=0.5", "optimizer.lr=0.01"]
    for name, extra in (("default", []), ("stale0", ["rollout.max_staleness=0"]), ("stale1", stale)):
        out = tmp_path / name
        res = _cli("train", "--config", SMOKE, f"logging.output_dir={out}", "steps=3", "sft.steps=0",
                   "logging.save_every=0", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = _rows(out / "metrics.jsonl")
    assert _comparable(runs["stale0"]) == _comparable(runs["default"])
    assert "rollout/staleness" not in runs["default"][0]
    assert [r["rollout/staleness"] for r in runs["stale1"]] == [0.0, 1.0, 1.0]
    # step 1 trains on a batch sampled by the weights it starts from, like the synchronous run; later ones do not
    assert runs["stale1"][0]["reward_mean"] == runs["default"][0]["reward_mean"]
    gaps = [r["rollout/engine_logprob_gap"] for r in runs["stale1"]]
    assert gaps[0] < 1e-5 < min(gaps[1:])  # step 1: fresh batch; steps 2-3: sampled one update ago
    assert runs["stale1"][1]["offpolicy/abs_log_rho_mean"] == pytest.approx(gaps[1], rel=1e-3)
