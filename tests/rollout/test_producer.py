"""The asynchronous rollout producer (rollout.async_producer) on the real environment with a scripted engine.

The scripted engine reads its weights: every sampled token's log-prob is ``-(1 + w)`` where ``w`` is the engine
model's single weight, and the test learner publishes ``w = version``. So a token's behaviour log-prob tells which
weights really sampled it, and the producer's version tag must agree with it.
"""

from __future__ import annotations

import copy
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
    return [float(t.meta["rollout_index"] % 2) for t in trajs], [{} for _ in trajs]


def _run(tmp_path, eta, partial, versions=6, score=_score_mixed, dynamic=False, delay=0.002, batch=2):
    train, tok, make_env = _setup(tmp_path)
    policy = torch.nn.Linear(1, 1, bias=False)
    policy.weight.data.fill_(0.0)
    engine = WeightReadingEngine(tok, delay=delay)
    stream = QuestionStream(train, seed=0)
    producer = AsyncProducer(engine, copy.deepcopy(policy), make_env(), stream, score, batch_size=batch,
                             group_size=3, params=SamplingParams(max_new_tokens=20), max_staleness=eta,
                             partial_rollouts=partial, dynamic_filtering=dynamic, max_filter_rounds=2,
                             stall_timeout=60)
    batches = []
    try:
        for v in range(versions):
            batch, metrics = producer.next_batch()
            batches.append((v, batch, metrics))
            time.sleep(0.01)  # the "update"
            policy.weight.data.fill_(float(v + 1))
            producer.publish(policy)
    finally:
        producer.close()
    return batches, stream, producer, train


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
    for partial in (True, False):
        batches, _, _, _ = _run(tmp_path / str(partial), eta=1, partial=partial, versions=8, delay=0.004)
        spans = [len({tv for tv in t.token_versions if tv >= 0}) for _, b, _ in batches for t in b.trajectories]
        mixed.append(sum(s > 1 for s in spans))
        if not partial:
            assert max(spans) == 1  # the update waited until nothing was in flight
    assert mixed[0] > 0  # some trajectory was interrupted by an update and continued under the new weights


def test_dynamic_filtering_drops_groups_releases_their_slots_and_caps_a_partial_batch(tmp_path):
    def score_half_uniform(trajs):  # questions with an even crc get one reward for the whole group: filtered out
        flat = zlib.crc32(trajs[0].meta["question"].encode()) % 2 == 0
        return [1.0 if flat else float(t.meta["rollout_index"] % 2) for t in trajs], [{} for _ in trajs]

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
