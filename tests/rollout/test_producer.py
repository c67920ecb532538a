"""The asynchronous rollout producer (rollout.async_producer) on the real environment with a scripted engine.

The scripted engine reads its weights: every sampled token's log-prob is ``-(1 + w)`` where ``w`` is the engine
model's single weight, and the test learner publishes ``w = version``. So a token's behaviour log-prob tells which
weights really sampled it, and the producer's version tag must agree with it.
"""

from __future__ import annotations

import copy
import pickle
import random
import time
import zlib

import pytest
import torch

from openrlhf_search.rollout.base import Generation, SamplingParams
from openrlhf_search.rollout.producer import AsyncProducer, staleness_metrics
from openrlhf_search.trainer.data import QuestionStream


class WeightReadingEngine:
    """Searches ``crc32(prompt) % 3`` times, then answers; log-prob of every token = ``-(1 + weight)``."""

    def __init__(self, tok, delay: float = 0.002, seed: int = 0):
        self.tok, self.delay, self.model, self.rng = tok, delay, None, random.Random(seed)
        self.updates = []

    def update_weights(self, model) -> None:
        self.model = model
        self.updates.append(float(model.weight.item()))

    def generate(self, prompts, params, row_max_new_tokens=None):
        time.sleep(self.delay * (1 + self.rng.random()))
        w = float(self.model.weight.item())
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            searches = text.count("</information>")
            want = zlib.crc32(text[:300].encode()) % 3
            s = "<search>alpha beta</search>" if searches < want else "<answer>gamma</answer>"
            ids = self.tok.encode(s, add_special_tokens=False)
            out.append(Generation(ids, [-(1.0 + w)] * len(ids), "stop"))
        return out


def _setup(tmp_path):
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.trainer.config import load_config
    from openrlhf_search.trainer.local import build_env, build_retriever, load_questions

    cfg = load_config(None, ["data.num_entities=20", "env.template=search_r1_compact", "env.max_obs_tokens=60",
                             "env.max_turns=4"])
    train, _, kb = load_questions(cfg, tmp_path)
    tok = build_tiny_tokenizer([d.contents for d in kb.corpus] * 2, vocab_size=600)
    retriever = build_retriever(cfg, tmp_path, kb)
    return train, tok, lambda: build_env(cfg, tok, retriever)


def _score_mixed(trajs):
    """0, 1, 0 within a group (the producer resets a group as G copies of its question: sample_index 0..G-1)."""
    return [float(t.meta["sample_index"] % 2) for t in trajs], [{} for _ in trajs]


def _run(tmp_path, eta, partial, versions=6, score=_score_mixed, dynamic=False, delay=0.002, batch=2, sync_turns=4,
         timing_seed=0, update_s=0.02, start=0, state=None, checkpoint_at=None):
    """``versions`` learner updates (the "update" sleeps up to ``update_s``, the engine ``delay`` to ``2 delay`` per
    turn, drawn with ``timing_seed``); ``start``/``state``: resume from a checkpoint state; ``checkpoint_at``: also
    return the state at that version."""
    train, tok, make_env = _setup(tmp_path)
    policy = torch.nn.Linear(1, 1, bias=False)
    policy.weight.data.fill_(float(start))
    engine = WeightReadingEngine(tok, delay=delay, seed=timing_seed)
    stream = QuestionStream(train, seed=0)
    if state is not None:
        stream.load_state_dict(state["data"])
    producer = AsyncProducer(engine, copy.deepcopy(policy), make_env(), stream, score, batch_size=batch,
                             group_size=3, params=SamplingParams(max_new_tokens=20), max_staleness=eta,
                             partial_rollouts=partial, weight_sync_turns=sync_turns, dynamic_filtering=dynamic,
                             max_filter_rounds=2, start_version=start, stall_timeout=60,
                             state=state["producer"] if state is not None else None)
    assert producer.restore_note is None
    batches, saved, learner_sleep = [], None, random.Random(timing_seed + 100)
    try:
        for v in range(start, start + versions):
            if v == checkpoint_at:
                saved = producer.checkpoint_state()
            batch, metrics = producer.next_batch()
            batches.append((v, batch, metrics))
            time.sleep(update_s * learner_sleep.random())  # the "update"
            policy.weight.data.fill_(float(v + 1))
            producer.publish(policy)
    finally:
        producer.close()
    if checkpoint_at is not None:
        return batches, stream, producer, train, saved
    return batches, stream, producer, train


def _content(batches) -> list:
    """Everything a batch hands the learner, timings aside."""
    return [(v, b.samples_used, b.group_ids, b.rewards, [(t.meta["question"], t.response_ids, t.logprobs,
             t.token_versions) for t in b.trajectories],
             {k: x for k, x in m.items() if not k.startswith("async/") or k == "async/groups_finished"})
            for v, b, m in batches]


@pytest.mark.parametrize("eta", [0, 1, 2])
def test_async_producer_strict_staleness_bound_and_token_versions_match_the_weights(tmp_path, eta):
    batches, _, _, _ = _run(tmp_path, eta, partial=True)
    seen = 0
    for v, batch, metrics in batches:
        assert len(batch.trajectories) == 2 * 3 and batch.group_ids == [0, 0, 0, 1, 1, 1]
        assert metrics["rollout/staleness_max"] <= eta
        for t in batch.trajectories:
            assert len(t.token_versions) == len(t.response_ids)
            for m, tv, lp in zip(t.action_mask, t.token_versions, t.logprobs):
                if m:  # the tag is the version whose weights sampled the token (its behaviour log-prob says so)
                    assert tv == round(-lp - 1.0) and tv <= v and v - tv <= eta
                    seen += 1
                else:
                    assert tv == -1
    assert seen > 0


def test_partial_rollouts_continue_under_new_weights_and_a_drain_never_mixes_versions(tmp_path):
    mixed = []
    for partial in (True, False):  # one turn of overlap: the update lands in the middle of 2- and 3-turn groups
        batches, _, _, _ = _run(tmp_path / str(partial), eta=1, partial=partial, versions=8, sync_turns=1)
        spans = [len({tv for tv in t.token_versions if tv >= 0}) for _, b, _ in batches for t in b.trajectories]
        mixed.append(sum(s > 1 for s in spans))
        if not partial:
            assert max(spans) == 1  # the update waited until nothing was in flight
    assert mixed[0] > 0  # some trajectory was interrupted by an update and continued under the new weights


def test_dynamic_filtering_drops_groups_releases_their_slots_and_caps_a_partial_batch(tmp_path):
    def score_half_uniform(trajs):  # questions with an even crc get one reward for the whole group: filtered out
        flat = zlib.crc32(trajs[0].meta["question"].encode()) % 2 == 0
        return [1.0 if flat else float(t.meta["sample_index"] % 2) for t in trajs], [{} for _ in trajs]

    batches, _, producer, _ = _run(tmp_path / "a", eta=1, partial=True, score=score_half_uniform, dynamic=True)
    assert any(m["filter/keep_ratio"] < 1.0 for _, _, m in batches)
    for _, batch, _ in batches:
        for j in set(batch.group_ids):
            assert len({r for r, g in zip(batch.rewards, batch.group_ids) if g == j}) > 1  # mixed groups only
    assert producer.bound.dropped > 0

    def score_uniform(trajs):
        return [1.0] * len(trajs), [{} for _ in trajs]

    batches, _, _, _ = _run(tmp_path / "b", eta=1, partial=True, score=score_uniform, dynamic=True, versions=3)
    for _, batch, m in batches:  # nothing ever passes: empty batches at the cap instead of a hang
        assert batch.trajectories == [] and m["filter/partial"] == 1.0 and m["filter/keep_ratio"] == 0.0


@pytest.mark.parametrize("eta,partial,sync_turns", [(1, True, 1), (2, True, 2), (2, False, 1), (2, True, 0)])
def test_the_schedule_does_not_depend_on_thread_timing(tmp_path, eta, partial, sync_turns):
    """The switch points are counted in turns: a run whose learner is faster than the engine and one whose engine is
    faster than the learner are identical."""
    runs = [_content(_run(tmp_path / str(seed), eta, partial, versions=6, sync_turns=sync_turns, delay=delay,
                          update_s=update_s, timing_seed=seed)[0])
            for seed, delay, update_s in ((1, 0.006, 0.0), (2, 0.0005, 0.03))]
    assert runs[0] == runs[1]
    assert any(tv >= 0 for b in runs[0] for row in b[4] for tv in row[3])


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_producer_restored_from_its_checkpoint_state_continues_exactly(tmp_path, dynamic):
    """The checkpoint state at version 2 holds the running groups (partial trajectories and their version tags), the
    finished ones, the groups the filter dropped since the last batch, the bound and the stream position: a producer
    restored from it produces exactly what the uninterrupted one produced from version 2 on."""
    def score(trajs):  # some groups of one reward (dropped by the filter), the others mixed
        flat = zlib.crc32(trajs[0].meta["question"].encode()) % 3 == 0
        return [1.0 if flat else float(t.meta["sample_index"] % 2) for t in trajs], [{} for _ in trajs]

    kw = dict(eta=2, partial=True, score=score, dynamic=dynamic, sync_turns=1)
    full, _, _, _, saved = _run(tmp_path / "a", versions=7, checkpoint_at=2, timing_seed=1, **kw)
    state = pickle.loads(saved["producer"])
    assert saved["version"] == 2 and state["running"] and state["done"]  # groups in flight and finished were saved
    assert state["dropped"] if dynamic else True
    resumed, _, _, _ = _run(tmp_path / "b", versions=5, start=2, state=saved, timing_seed=2, **kw)
    assert _content(resumed) == _content(full[2:])
    assert sum(len(b.trajectories) for _, b, _ in resumed) > 0


def test_a_state_taken_with_another_rollout_config_is_not_used_and_says_why(tmp_path):
    _, _, _, train, saved = _run(tmp_path / "a", eta=1, partial=True, versions=3, checkpoint_at=2, sync_turns=1)
    _, tok, make_env = _setup(tmp_path / "b")
    stream = QuestionStream(train, seed=0)
    stream.load_state_dict(saved["data"])  # what the trainer loads first: the open groups' questions requeued
    policy = torch.nn.Linear(1, 1, bias=False)
    producer = AsyncProducer(WeightReadingEngine(tok), policy, make_env(), stream, _score_mixed, batch_size=2,
                             group_size=3, params=SamplingParams(max_new_tokens=20), max_staleness=1,
                             weight_sync_turns=2, max_filter_rounds=2, start_version=2, state=saved["producer"])
    try:
        assert producer.restore_note == "taken with another rollout config: weight_sync_turns 1 -> 2"
        state = pickle.loads(saved["producer"])
        open_groups = sorted(state["running"] + state["done"], key=lambda g: g.key)
        assert open_groups and saved["data"]["requeue"] == [g.stream_index for g in open_groups]
        used = []
        for _ in range(2):  # the requeued questions are served first: sampled again, not lost
            batch, _ = producer.next_batch()
            used += batch.samples_used
            producer.publish(None)
        assert {train[i].id for i in saved["data"]["requeue"]} <= set(used)
    finally:
        producer.close()


def test_checkpoint_state_requeues_every_unconsumed_group(tmp_path):
    batches, stream, producer, train = _run(tmp_path, eta=2, partial=True, versions=4)
    state = producer.data_state()
    consumed = [q for _, b, _ in batches for q in b.samples_used]
    assert len(consumed) == len(set(consumed)) == 4 * 2
    handed_out = [train[i].id for i, _ in QuestionStream(train, seed=0).take_indexed(stream.position)]
    requeued = [train[i].id for i in state["requeue"]]
    assert sorted(consumed + requeued) == sorted(handed_out)  # nothing lost, nothing twice
    resumed = QuestionStream(train, seed=0)
    resumed.load_state_dict(state)
    assert [s.id for s in resumed.take(len(requeued) + 2)] == requeued + [s.id for s in stream.take(2)]


def test_staleness_metrics_histogram():
    class T:
        def __init__(self, tv):
            self.token_versions = tv

    m = staleness_metrics([0, 1, 1, 2], [T([3, 3, -1, 4]), T([4, 4])], version=4)
    assert m["rollout/staleness_hist_1"] == 0.5 and m["rollout/staleness_max"] == 2.0
    assert m["rollout/token_staleness_mean"] == pytest.approx(2 / 5) and m["rollout/partial_share"] == 0.5


def test_producer_failure_reaches_the_learner_with_its_cause(tmp_path):
    train, tok, make_env = _setup(tmp_path)

    class Broken(WeightReadingEngine):
        def generate(self, prompts, params, row_max_new_tokens=None):
            raise ConnectionError("retriever at http://x:1 refused")

    from openrlhf_search.rollout.producer import ProducerError

    producer = AsyncProducer(Broken(tok), torch.nn.Linear(1, 1, bias=False), make_env(), QuestionStream(train),
                             _score_mixed, batch_size=2, group_size=2, params=SamplingParams(), max_staleness=1)
    with pytest.raises(ProducerError, match="refused") as err:
        producer.next_batch()
    assert isinstance(err.value.__cause__, ConnectionError)
    producer.close()


def test_staleness_histogram_reaches_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from openrlhf_search.trainer.logging import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(1, {"rollout/staleness_mean": 2 / 3}, histograms={"rollout/staleness": [0, 1, 1]})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "rollout/staleness" in acc.Tags()["histograms"]
    hist = acc.Histograms("rollout/staleness")[0].histogram_value
    assert hist.num == 3 and hist.sum == 2 and hist.max == 1
