"""Resume after SIGTERM and SIGKILL continues the run exactly, on a run that really trains.

A reward with variance on the untrained tiny policy (the parity of the response's length) gives non-zero advantages,
so every step moves the weights and the optimizer's moments. Each interrupted chain is: a run that receives SIGTERM
during a step (it finishes the step, checkpoints, exits 75), ``--resume``, SIGKILL in the middle of a later step
(nothing saved for that step), ``--resume`` to the end. The signals come from an identity advantage post-processor of
the test plugin, which the learner runs in every step, at the first call after a given number of logged steps: where
they land depends neither on the machine's speed nor on which thread samples the rollouts.

Full fine-tuning, LoRA (the synchronous loop) and the asynchronous producer (a staleness bound of 1, one turn of
overlap, so updates land in the middle of trajectories): the final checkpoint equals the uninterrupted run's bit for
bit (weights, LoRA adapter, optimizer moments and step counts, LR schedule, RNG states, data position, the producer's
open groups), and so does every logged metric but timings, the engine's log-prob gap included.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "examples" / "configs" / "smoke.yaml")
STEPS = 7
MINIBATCHES = 2  # smoke.yaml's algorithm.num_minibatches: optimizer steps per RL step

SIGNAL_PLUGIN = '''
import os
import signal
from pathlib import Path

from openrlhf_search.algorithms.postprocess import register_advantage_postprocessor
from openrlhf_search.rewards import register_reward

_sent = []


@register_reward("test_parity")
def _reward(**cfg):
    """Reward = parity of the response length (variance on an untrained model: non-zero advantages)."""
    def fn(response_text, golden_answers, retrieved_text="", *, answer):
        return float(len(response_text) % 2), {"answer": answer, "em": 0.0, "subem": 0.0, "f1": 0.0,
                                               "valid_format": True, "format_error": "", "retrieval_hit": False}
    return fn


@register_advantage_postprocessor("test_signal")
def _signal(**cfg):
    """The identity, which sends $TEST_SIGNAL to this process once, in the learner's step after $TEST_SIGNAL_AFTER
    logged steps (the learner's own thread: the signal lands in that step whatever thread samples the rollouts)."""
    def fn(advantages, action_mask, group_ids, records):
        after = os.environ.get("TEST_SIGNAL_AFTER")
        metrics = Path(os.environ["TEST_RUN_DIR"]) / "metrics.jsonl"
        if after and not _sent and metrics.exists() and len(metrics.read_text().splitlines()) >= int(after):
            _sent.append(True)
            os.kill(os.getpid(), getattr(signal, os.environ["TEST_SIGNAL"]))
        return advantages, {}
    return fn
'''

VARIANTS = {
    "full": [],
    "lora": ["model.lora_rank=4"],
    # an LR warm-up: the logged LR counts the run's optimizer steps
    "async": ["rollout.async_producer=true", "rollout.max_staleness=1", "rollout.weight_sync_turns=1",
              "algorithm.name=grpo+tis", "optimizer.warmup_steps=100"],
}


def _env(plugin_dir: Path, out: Path, signal_name: str | None = None, after: int | None = None) -> dict:
    (plugin_dir / "test_resume_signal_plugin.py").write_text(SIGNAL_PLUGIN)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TEST_RUN_DIR=str(out))
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key in ("TEST_SIGNAL", "TEST_SIGNAL_AFTER"):
        env.pop(key, None)
    if signal_name:
        env.update(TEST_SIGNAL=signal_name, TEST_SIGNAL_AFTER=str(after))
    return env


def _args(out: Path, extra: list[str]) -> list[str]:
    return ["train", "--config", SMOKE, f"logging.output_dir={out}", f"steps={STEPS}", "sft.steps=0",
            "data.num_eval=1", "logging.save_every=1",
            "plugins=[test_resume_signal_plugin]", "env.reward=test_parity",
            "algorithm.advantage_postprocessors=[test_signal]", *extra]


def _run(plugin_dir: Path, out: Path, extra: list[str], *flags: str, signal_name: str | None = None,
         after: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openrlhf_search", *_args(out, extra), *flags], capture_output=True,
                          text=True, timeout=300, env=_env(plugin_dir, out, signal_name, after), cwd=str(REPO))


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _latest_step(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])


def _final(out: Path) -> Path:
    return out / "checkpoints" / f"step_{STEPS:06d}"


def _state(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step_{step:06d}" / "trainer_state.pt", map_location="cpu",
                      weights_only=False)


def _interrupted_chain(plugin_dir: Path, out: Path, extra: list[str]) -> list[dict]:
    """SIGTERM during step 2, --resume, SIGKILL during step 5, --resume to the end; returns the producer states of
    the two checkpoints resumed from (asynchronous runs)."""
    term = _run(plugin_dir, out, extra, signal_name="SIGTERM", after=1)
    assert term.returncode == 75, term.stderr[-3000:]
    assert "SIGTERM" in term.stderr and "Traceback" not in term.stderr
    assert _latest_step(out) == 2
    assert [r["step"] for r in _rows(out)] == [1, 2]
    resumed_from = [_producer_state(_state(out, 2))]
    killed = _run(plugin_dir, out, extra, "--resume", signal_name="SIGKILL", after=4)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert "at step 2" in killed.stdout
    assert _latest_step(out) == 4  # step 5 began, nothing of it saved
    resumed_from.append(_producer_state(_state(out, 4)))
    last = _run(plugin_dir, out, extra, "--resume")
    assert last.returncode == 0, last.stderr[-3000:]
    assert "at step 4" in last.stdout
    assert [r["step"] for r in _rows(out)] == list(range(1, STEPS + 1))  # every step exactly once
    return [p for p in resumed_from if p is not None]


def _assert_identical(a, b, path: str = "state") -> None:
    """Bit-for-bit equality of nested checkpoint state (tensors, arrays, dicts, lists, scalars)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: max |diff| {float((a.double() - b.double()).abs().max())}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _comparable(rows: list[dict]) -> list[dict]:
    def timing(k: str) -> bool:
        return k.startswith(("time/", "async/", "memory/")) or k == "wall_time" or "seconds" in k or "_ms" in k

    return [{k: v for k, v in r.items() if not timing(k)} for r in rows]


def _producer_state(state: dict) -> dict | None:
    """The producer's pickled checkpoint state, unpickled (its groups compare as dataclasses)."""
    return pickle.loads(state["producer"]) if "producer" in state else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request):
    """Uninterrupted runs, one per variant (built on first use)."""
    runs: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in runs:
            root = tmp_path_factory.mktemp(f"ref_{variant}")
            res = _run(root, root / "run", VARIANTS[variant])
            assert res.returncode == 0, res.stderr[-3000:]
            runs[variant] = root / "run"
        return runs[variant]

    return get


def test_the_resume_fixture_really_trains(reference):
    """Advantages, gradients and moved weights at every step, and importance ratios away from 1 (the second
    minibatch of a step sees the weights the first one moved): an exact resume is not trivially exact."""
    rows = _rows(reference("full"))
    assert len(rows) == STEPS
    assert all(r["update/skipped_nonfinite"] == 0 for r in rows)
    trained = [r for r in rows if r["adv_abs_mean"] > 0.1]  # a group of equal rewards has no advantage
    assert len(trained) >= STEPS - 2 and all(r["update/grad_norm"] > 0 for r in trained)
    assert len({r["reward_mean"] for r in rows}) > 1
    assert max(max(r["loss/ratio_max"] - 1, 1 - r["loss/ratio_min"]) for r in rows) > 1e-3
    state = torch.load(_final(reference("full")) / "trainer_state.pt", map_location="cpu", weights_only=False)
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {float(STEPS * MINIBATCHES)}  # every minibatch an AdamW step


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigterm_then_sigkill_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, reference, variant):
    out = tmp_path / "run"
    saved = _interrupted_chain(tmp_path, out, VARIANTS[variant])
    ref = reference(variant)
    rows = _rows(ref)
    assert all(r["update/skipped_nonfinite"] == 0 for r in rows)
    assert sum(r["adv_abs_mean"] > 0.1 and r["update/grad_norm"] > 0 for r in rows) >= STEPS - 2  # it trains
    if variant == "async":  # updates landed mid-trajectory
        assert max(r.get("rollout/partial_share", 0) for r in rows) > 0
        lr = 1e-3  # smoke.yaml's optimizer.lr; warm-up: lr * (s + 1) / 100 after s optimizer steps
        want_lr = [lr * (s * MINIBATCHES + 1) / 100 for s in range(1, STEPS + 1)]
        assert [r["lr"] for r in rows] == pytest.approx(want_lr)
    _assert_identical(_comparable(rows), _comparable(_rows(out)), "metrics")
    _assert_identical(_safetensors(_final(ref) / "model.safetensors"),
                      _safetensors(_final(out) / "model.safetensors"), "weights")
    if variant == "lora":
        _assert_identical(_safetensors(_final(ref) / "adapter" / "adapter_model.safetensors"),
                          _safetensors(_final(out) / "adapter" / "adapter_model.safetensors"), "adapter")
    want = torch.load(_final(ref) / "trainer_state.pt", map_location="cpu", weights_only=False)
    got = torch.load(_final(out) / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert want["optimizer"]["state"], "the optimizer holds no state"
    assert {float(s["step"]) for s in want["optimizer"]["state"].values()} == {float(STEPS * MINIBATCHES)}
    assert want.keys() == got.keys()
    for key in ("step", "optimizer", "scheduler", "data", "rng"):
        _assert_identical(want[key], got[key], key)
    _assert_identical(_producer_state(want), _producer_state(got), "producer")
    if variant == "async":  # the checkpoint resumed from held a group in flight
        assert len(saved) == 2 and saved[0]["running"], "no group in flight at step 2 (did smoke.yaml change?)"
