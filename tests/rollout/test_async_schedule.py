import random

import pytest

from openrlhf_search.rollout.async_schedule import (
    StalenessBound,
    StalenessError,
    VersionedTrajectory,
    WeightMailbox,
    generate_turn,
)


def _simulate(eta, batch, steps, seed, lag):
    """Random completion order, random engine lag (the engine applies a new version only with probability 1-lag)."""
    rng = random.Random(seed)
    bound = StalenessBound(batch, eta)
    engine_version, in_flight, done, consumed, key = 0, {}, [], [], 0
    while bound.learner_version < steps:
        if rng.random() > lag:
            engine_version = bound.learner_version
        while bound.can_start(engine_version) and rng.random() < 0.7:
            in_flight[key] = bound.start(engine_version)
            key += 1
        for k in [k for k in in_flight if rng.random() < 0.3]:
            done.append((in_flight.pop(k), k))
        chosen = bound.take_batch(done)
        if chosen is not None:
            tags = {k: t for t, k in done}
            consumed += [bound.staleness(tags[k]) for k in chosen]
            done = [(t, k) for t, k in done if k not in set(chosen)]
            bound.publish()
    return consumed


@pytest.mark.parametrize("eta", [0, 1, 2, 4])
@pytest.mark.parametrize("lag", [0.0, 0.6])
def test_staleness_bound_is_never_exceeded(eta, lag):
    for seed in range(5):
        st = _simulate(eta, batch=4, steps=30, seed=seed, lag=lag)
        assert len(st) == 4 * 30
        assert max(st) <= eta
        if eta and not lag:
            assert max(st) == eta  # the bound is used, not just respected


def test_zero_staleness_is_the_synchronous_loop():
    bound = StalenessBound(3, 0)
    tags = [bound.start() for _ in range(3)]
    assert not bound.can_start() and tags == [0, 0, 0]
    assert bound.take_batch([(0, "a"), (0, "b")]) is None  # waits for the last one
    assert bound.take_batch([(0, "a"), (0, "b"), (0, "c")]) == ["a", "b", "c"]
    bound.publish()
    assert bound.can_start() and bound.start() == 1


def test_overdue_items_are_waited_for_and_taken_first():
    bound = StalenessBound(2, 1)
    a, b = bound.start(), bound.start()
    assert bound.take_batch([(a, "a"), (b, "b")]) == ["a", "b"]
    bound.publish()
    old = [bound.start(0) for _ in range(2)]  # a lagging engine still samples with version 0: due now
    new = [bound.start(1) for _ in range(2)]
    assert not bound.can_start(0) and not bound.can_start(1) and old == [0, 0] and new == [1, 1]
    # one tag-0 item still runs: taking the two tag-1 items would leave it over-stale, so the learner waits
    assert bound.take_batch([(1, "x"), (1, "y"), (0, "old1")]) is None
    assert bound.take_batch([(1, "x"), (0, "old2"), (1, "y"), (0, "old1")]) == ["old2", "old1"]


def test_lagging_engine_is_admitted_less_and_never_too_stale():
    bound = StalenessBound(2, 1)
    for _ in range(4):
        bound.start()
    assert bound.take_batch([(0, i) for i in range(2)]) is not None
    bound.publish()
    bound.take_batch([(0, i) for i in range(2)])
    bound.publish()  # learner at 2: version-0 weights can no longer produce usable samples
    assert not bound.can_start(0) and bound.can_start(1)


def test_bypassing_admission_is_caught():
    bound = StalenessBound(1, 0)
    bound.start()
    with pytest.raises(StalenessError, match="admission refused"):
        bound.start()
    bound.open_tags[0] += 1  # planted bug: the producer started an item without asking
    with pytest.raises(StalenessError, match="admission was bypassed"):
        bound.take_batch([(0, "a"), (0, "b")])
    with pytest.raises(StalenessError, match="without a take_batch"):
        StalenessBound(1, 0).publish()


class ScriptedEngine:
    """Samples token ``100 * version + turn`` with log-prob ``-0.1 * (version + 1)`` (distinct per version)."""

    def __init__(self):
        self.turn = 0

    def __call__(self, version):
        self.turn += 1
        return [100 * version + self.turn] * 2, [-0.1 * (version + 1)] * 2


@pytest.mark.parametrize("partial", [True, False])
def test_partial_rollout_tags_versions_and_behaviour_logprobs(partial):
    box, eng, traj = WeightMailbox(partial_rollouts=partial), ScriptedEngine(), VersionedTrajectory()
    generate_turn(traj, eng, box)
    traj.extend_observation([7, 7, 7])  # retrieved passage
    box.post(1)  # the learner published version 1 mid-trajectory
    assert box.blocks_admission() == (not partial)
    generate_turn(traj, eng, box)
    box.post(2)
    generate_turn(traj, eng, box)
    if partial:
        assert traj.versions == [0, 0, -1, -1, -1, 1, 1, 2, 2]
        assert traj.behaviour_logprobs == pytest.approx([-0.1, -0.1, 0, 0, 0, -0.2, -0.2, -0.3, -0.3])
        assert traj.token_ids[5:] == [102, 102, 203, 203]
        assert (traj.oldest_version, traj.newest_version) == (0, 2)
    else:  # the update waits for the drain: the whole trajectory is version 0
        assert traj.versions == [0, 0, -1, -1, -1, 0, 0, 0, 0]
        assert traj.behaviour_logprobs == pytest.approx([-0.1, -0.1, 0, 0, 0, -0.1, -0.1, -0.1, -0.1])
        nxt = VersionedTrajectory()
        generate_turn(nxt, eng, box, in_flight=0)  # drained: the next trajectory gets the latest weights
        assert nxt.versions == [2, 2] and box.pending is None


def test_mailbox_rejects_old_versions():
    box = WeightMailbox()
    box.post(1)
    with pytest.raises(StalenessError):
        box.post(1)


def test_simulator_smoke_respects_the_bound():
    """benchmarks/async_rollout_sim.py on a tiny batch: runs, and consumed staleness never exceeds the scenario's."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "async_rollout_sim.py"
    spec = importlib.util.spec_from_file_location("async_rollout_sim", path)
    sim = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sim  # dataclasses look their module up
    try:
        spec.loader.exec_module(sim)
    finally:
        del sys.modules[spec.name]
    for sc in sim.SCENARIOS:
        r = sim.simulate(sim.PROFILES["long_tailed"], sim.Hardware(slots_per_gpu=2), sc, prompts=4, group=2, steps=5,
                         warmup=2, seed=1)
        assert max(int(k) for k in r["staleness_hist"]) <= sc.max_staleness
        assert r["traj_per_s"] > 0 and 0 <= r["learner_idle"] <= 1
        if not sc.partial:
            assert r["multi_version_traj_share"] == 0
