"""The local trainer's batch sources (synchronous, stale queue, asynchronous producer), each on its own.

A scripted engine reads its weights: every sampled token's log-prob is ``-(1 + w)`` where ``w`` is the single weight
of the model the engine holds, and the test learner sets ``w = version`` before each ``after_update``. So a batch's
log-probs tell which weights sampled it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
from openrlhf_search.rollout.base import Generation, SamplingParams
from openrlhf_search.rollout.producer import AsyncProducer
from openrlhf_search.trainer.config import load_config
from openrlhf_search.trainer.data import QuestionStream
from openrlhf_search.trainer.local import build_env, build_retriever, build_source, load_questions
from openrlhf_search.trainer.sources import AsyncSource, StaleQueueSource, SyncSource


class WeightEngine:
    """Answers at once; log-prob of every token = ``-(1 + weight)``."""

    def __init__(self, tok):
        self.tok, self.model, self.updates = tok, None, []

    def update_weights(self, model) -> None:
        self.model = model
        self.updates.append(float(model.weight.item()))

    def generate(self, prompts, params, row_max_new_tokens=None):
        w = float(self.model.weight.item())
        ids = self.tok.encode("<answer>gamma</answer>", add_special_tokens=False)
        return [Generation(ids, [-(1.0 + w)] * len(ids), "stop") for _ in prompts]


def _score_mixed(trajs):
    return [float(t.meta["rollout_index"] % 2) for t in trajs], [{} for _ in trajs]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    cfg = load_config(None, ["data.num_entities=20", "env.template=search_r1_compact", "env.max_turns=2",
                             "rollout.prompts_per_step=2", "rollout.group_size=2"])
    train, _, kb = load_questions(cfg, tmp)
    tok = build_tiny_tokenizer([d.contents for d in kb.corpus] * 2, vocab_size=600)
    retriever = build_retriever(cfg, tmp, kb)
    return cfg, train, tok, retriever


def _policy(w: float = 0.0):
    policy = torch.nn.Linear(1, 1, bias=False)
    policy.weight.data.fill_(w)
    return policy


def _sampled_by(batch) -> set[float]:
    return {round(-lp - 1.0) for t in batch.trajectories for lp, m in zip(t.logprobs, t.action_mask) if m}


def _shape(**kw):
    return dict(prompts_per_step=2, group_size=2, params=SamplingParams(max_new_tokens=8), dynamic_filtering=False,
                max_filter_rounds=1, **kw)


def test_sync_source_samples_with_the_current_weights_and_snapshots_the_stream(world):
    cfg, train, tok, retriever = world
    engine, policy, stream = WeightEngine(tok), _policy(), QuestionStream(train, seed=0)
    engine.update_weights(policy)
    source = SyncSource(engine, build_env(cfg, tok, retriever), stream, _score_mixed, **_shape(start_version=3))
    assert source.version == 3 and source.eval_engine is engine
    for v in range(3):
        batch, metrics = source.next_batch()
        assert metrics == {} and len(batch.trajectories) == 4 and _sampled_by(batch) == {v}
        policy.weight.data.fill_(v + 1)
        source.after_update(policy)
        assert source.version == 3 + v + 1
    updates = len(engine.updates)
    source.after_update(None)  # a skipped update: no new weights, same version
    assert len(engine.updates) == updates and source.version == 6
    snap = source.snapshot()
    resumed = QuestionStream(train, seed=0)
    resumed.load_state_dict(snap["data"])
    assert [s.id for s in resumed.take(3)] == [s.id for s in stream.take(3)]


@pytest.mark.parametrize("k", [1, 2])
def test_stale_queue_trains_on_batches_sampled_k_versions_ago(world, k):
    cfg, train, tok, retriever = world
    engine, policy = WeightEngine(tok), _policy()
    engine.update_weights(policy)
    source = StaleQueueSource(engine, build_env(cfg, tok, retriever), QuestionStream(train, seed=0), _score_mixed,
                              max_staleness=k, **_shape())
    seen = []
    for v in range(5):
        batch, metrics = source.next_batch()
        (sampled_by,) = _sampled_by(batch)
        assert metrics["rollout/staleness"] == v - sampled_by  # the logged staleness is the true one
        seen.append(v - sampled_by)
        policy.weight.data.fill_(v + 1)
        source.after_update(policy)
    assert seen == [min(v, k) for v in range(5)]
    with pytest.raises(ValueError, match="max_staleness"):
        StaleQueueSource(engine, None, None, _score_mixed, max_staleness=0, **_shape())


def test_async_source_counts_batches_and_leaves_the_engine_with_the_final_weights(world):
    cfg, train, tok, retriever = world
    engine, policy = WeightEngine(tok), _policy()
    producer = AsyncProducer(engine, copy.deepcopy(policy), build_env(cfg, tok, retriever),
                             QuestionStream(train, seed=0), _score_mixed, batch_size=2, group_size=2,
                             params=SamplingParams(max_new_tokens=8), max_staleness=1, start_version=4)
    eval_engine = WeightEngine(tok)
    source = AsyncSource(producer, engine, eval_engine, "eval-env")
    try:
        assert source.version == 4 and source.eval_engine is eval_engine and source.eval_env == "eval-env"
        batch, metrics = source.next_batch()
        assert metrics == {} and len(batch.trajectories) == 4
        assert source.histograms() == {"rollout/staleness": producer.last_group_staleness}
        share = source.step_metrics({"async/learner_idle_s": 0.5}, 2.0)
        assert share == {"async/learner_idle_share": 0.25}
        assert set(source.progress_fields({**batch.metrics, **share})) == {"stale", "idle"}
        source.after_update(None)  # skipped: the version still advances (the bound counts batches)
        assert source.version == 5
        source.next_batch()
        policy.weight.data.fill_(7.0)
        source.after_update(policy)
        assert source.version == 6
        assert "requeue" in source.snapshot()["data"]
    finally:
        source.close(policy)
    assert engine.updates[-1] == 7.0  # the final evaluation samples from the trained weights


@pytest.mark.parametrize("overrides,kind", [([], SyncSource), (["rollout.max_staleness=1"], StaleQueueSource),
                                            (["rollout.async_producer=true", "rollout.max_staleness=1"],
                                             AsyncSource)])
def test_build_source_follows_the_rollout_config(world, overrides, kind):
    cfg, train, tok, retriever = world
    cfg = load_config(None, ["data.num_entities=20", "env.template=search_r1_compact", *overrides])

    class Preset:
        dynamic_filter = False

    engine = WeightEngine(tok)
    policy = _policy()
    engine.update_weights(policy)
    source = build_source(cfg, policy, engine, build_env(cfg, tok, retriever), tok, retriever,
                          QuestionStream(train, seed=0), _score_mixed, Preset(), SamplingParams(max_new_tokens=8),
                          None, 2)
    try:
        assert type(source) is kind and source.version == 2
    finally:
        source.close(policy)


@pytest.mark.parametrize("error", ["unavailable", "connection"])
def test_a_retriever_failing_mid_run_saves_the_last_step_and_exits_3(tmp_path, monkeypatch, capsys, error):
    from openrlhf_search.retrieval.errors import RetrieverUnavailable
    from openrlhf_search.trainer import local
    from openrlhf_search.trainer.checkpoint import find_resume_checkpoint
    from openrlhf_search.trainer.preemption import EXIT_RETRIEVER

    down = {"now": False}
    real_env, real_after = local.build_env, SyncSource.after_update

    def build_env_failing(cfg, tok, retriever):  # the environment's searches go to a retriever that can fail
        env = real_env(cfg, tok, retriever)
        step = env.step

        def failing_step(trajs, gens):
            if down["now"]:  # what env.step's retriever.search raises when the server is gone
                raise (RetrieverUnavailable("server gone") if error == "unavailable"
                       else ConnectionRefusedError("refused"))
            return step(trajs, gens)

        env.step = failing_step
        return env

    def after_update(self, policy):
        real_after(self, policy)
        down["now"] = True  # step 1 is done; step 2's first turn fails

    monkeypatch.setattr(local, "build_env", build_env_failing)
    monkeypatch.setattr(SyncSource, "after_update", after_update)
    cfg = load_config("examples/configs/smoke.yaml", [f"logging.output_dir={tmp_path / 'run'}", "sft.steps=0",
                                                      "data.num_eval=0", "logging.save_every=0"])
    assert local.train_or_exit_code(cfg, "fresh", "prog") == EXIT_RETRIEVER
    err = capsys.readouterr().err
    assert "step 2: the retriever failed" in err and "--resume" in err
    _, state = find_resume_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["step"] == 1  # the state after the last complete step, saved before the run stopped


def test_async_snapshot_is_exact_until_the_producer_fails_then_requeues_its_open_groups(world):
    """The exact producer state needs the engine to reach the learner's version; when the producer failed before
    that (a retriever outage in a turn), the snapshot falls back to the stream with every open group's question
    requeued: what is saved before the run stops loses and repeats no question."""
    cfg, train, tok, retriever = world

    class FailingEngine(WeightEngine):
        def generate(self, prompts, params, row_max_new_tokens=None):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2:
                raise ConnectionError("retriever gone")
            return super().generate(prompts, params, row_max_new_tokens)

    engine, policy, stream = FailingEngine(tok), _policy(), QuestionStream(train, seed=0)
    producer = AsyncProducer(engine, copy.deepcopy(policy), build_env(cfg, tok, retriever), stream, _score_mixed,
                             batch_size=2, group_size=2, params=SamplingParams(max_new_tokens=8), max_staleness=1)
    source = AsyncSource(producer, engine, WeightEngine(tok), "eval-env")
    consumed = []
    try:
        for v in range(2):
            exact = source.snapshot()
            assert "producer" in exact and exact["data"] == producer.checkpoint_state()["data"]
            batch, _ = source.next_batch()
            consumed += batch.samples_used
            policy.weight.data.fill_(v + 1.0)
            source.after_update(policy)
        fallback = source.snapshot()  # the producer failed in the turn after it formed batch 1
        assert "producer" not in fallback and "rng" in fallback
        requeued = [train[i].id for i in fallback["data"]["requeue"]]
        handed_out = [train[i].id for i, _ in QuestionStream(train, seed=0).take_indexed(stream.position)]
        assert requeued and sorted(consumed + requeued) == sorted(handed_out)
    finally:
        source.close(policy)
