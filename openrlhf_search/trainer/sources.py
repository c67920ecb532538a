"""Where the local trainer's batches come from: the three rollout modes behind one small interface.

The step loop (:func:`openrlhf_search.trainer.local.train`) asks a :class:`BatchSource` for the step's batch,
updates the policy on it and tells the source what happened; it never asks which mode it runs in::

    batch, metrics = source.next_batch()        # sample (or take a sampled batch)
    ... advantages, old log-probs, update ...
    source.after_update(policy)                 # or after_update(None): the update was skipped
    source.snapshot()                           # data position + RNG, for a checkpoint of the previous step

* :class:`SyncSource` (``rollout.max_staleness = 0``, the default): the batch is sampled now, by the weights the
  learner holds; bit-reproducible.
* :class:`StaleQueueSource` (``rollout.max_staleness = k > 0``, synchronous): batches are sampled ahead and queued,
  so the batch trained on was sampled ``k`` versions ago (the off-policy setting ``+tis``/``+mis`` correct for).
* :class:`AsyncSource` (``rollout.async_producer``): a background thread
  (:class:`~openrlhf_search.rollout.producer.AsyncProducer`) keeps the engine busy while the learner updates; its
  schedule depends on the producer's own progress only, so it is bit-reproducible and its snapshot is exact.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from openrlhf_search.rollout.base import SamplingParams
from openrlhf_search.rollout.producer import AsyncProducer, ProducerError
from openrlhf_search.rollout.runner import PhaseTimer, RolloutBatch, collect_groups
from openrlhf_search.trainer.checkpoint import capture_rng_state


class BatchSource:
    """The interface the step loop uses (the base class is also the documentation of each method).

    Attributes:
        eval_engine, eval_env: what mid-run evaluation samples with (the rollout engine itself, unless it belongs
            to another thread).
        version: the learner's policy version the next batch is trained at (the run's start step, plus one per
            update; with the asynchronous producer one per batch, updated or not).
    """

    eval_engine: Any
    eval_env: Any
    version: int

    def next_batch(self) -> tuple[RolloutBatch, dict[str, float]]:
        """The step's batch (group-major rows; empty when dynamic filtering kept no group) and the source's own
        metrics for this step (staleness)."""
        raise NotImplementedError

    def after_update(self, policy) -> None:
        """The learner finished with the batch: ``policy`` holds the new weights, or is ``None`` when the update
        was skipped (an empty batch)."""
        raise NotImplementedError

    def snapshot(self) -> dict:
        """``{"data": ..., "rng": ...}``: what a checkpoint stores so a resumed run samples what this one would."""
        raise NotImplementedError

    def step_metrics(self, batch_metrics: dict[str, float], step_seconds: float) -> dict[str, float]:
        """Extra metrics once the step's wall time is known (none by default)."""
        del batch_metrics, step_seconds
        return {}

    def progress_fields(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Extra fields of the progress bar (none by default)."""
        del metrics
        return {}

    def histograms(self) -> dict[str, list[float]] | None:
        """Per-step histograms for TensorBoard (none by default)."""
        return None

    def close(self, policy) -> None:
        """Stop sampling; afterwards the rollout engine holds ``policy``'s weights (the final evaluation's)."""
        del policy


class SyncSource(BatchSource):
    """Sample the step's batch now with the current weights (:func:`~openrlhf_search.rollout.runner.collect_groups`:
    DSPO/DAPO filtering resamples until the batch is full, capped at ``max_filter_rounds``).

    Args:
        engine, env: the rollout engine and the search environment.
        stream: the :class:`~openrlhf_search.trainer.data.QuestionStream` (``take``, ``state_dict``).
        score: ``score(trajs) -> (rewards, infos)``.
        prompts_per_step, group_size, params, dynamic_filtering, max_filter_rounds: the batch's shape and sampling.
        timer: accumulates generation/retrieval/env seconds.
    """

    def __init__(self, engine, env, stream, score: Callable, *, prompts_per_step: int, group_size: int,
                 params: SamplingParams, dynamic_filtering: bool, max_filter_rounds: int,
                 timer: PhaseTimer | None = None, start_version: int = 0):
        self.engine, self.env, self.stream, self.score = engine, env, stream, score
        self.eval_engine, self.eval_env = engine, env
        self.prompts_per_step, self.group_size, self.params = prompts_per_step, group_size, params
        self.dynamic_filtering, self.max_filter_rounds = dynamic_filtering, max_filter_rounds
        self.timer = timer or PhaseTimer()
        self.version = int(start_version)

    def _collect(self) -> RolloutBatch:
        return collect_groups(self.engine, self.env, self.stream.take, self.score, target_groups=self.prompts_per_step,
                              group_size=self.group_size, params=self.params,
                              dynamic_filtering=self.dynamic_filtering, max_rounds=self.max_filter_rounds,
                              timer=self.timer)

    def next_batch(self) -> tuple[RolloutBatch, dict[str, float]]:
        return self._collect(), {}

    def after_update(self, policy) -> None:
        if policy is not None:  # a skipped update leaves the weights, hence the version, unchanged
            self.engine.update_weights(policy)
            self.version += 1

    def snapshot(self) -> dict:
        return {"data": self.stream.state_dict(), "rng": capture_rng_state(getattr(self.engine, "generator", None))}


class StaleQueueSource(SyncSource):
    """:class:`SyncSource` with ``max_staleness`` batches sampled ahead: the batch trained on at version ``v`` was
    sampled by version ``v - max_staleness`` (fewer during the first steps). Logs ``rollout/staleness``.

    The queued batches are not checkpointed, so such a run cannot be resumed (the config check refuses it).
    """

    def __init__(self, *args, max_staleness: int, **kwargs):
        super().__init__(*args, **kwargs)
        if max_staleness < 1:
            raise ValueError(f"rollout.max_staleness={max_staleness}: the stale queue needs >= 1")
        self.max_staleness = int(max_staleness)
        self.queue: collections.deque[tuple[int, RolloutBatch]] = collections.deque()

    def next_batch(self) -> tuple[RolloutBatch, dict[str, float]]:
        while len(self.queue) < self.max_staleness + 1:
            self.queue.append((self.version, self._collect()))
        sampled_by, batch = self.queue.popleft()
        return batch, {"rollout/staleness": float(self.version - sampled_by)}


class AsyncSource(BatchSource):
    """Batches from the :class:`~openrlhf_search.rollout.producer.AsyncProducer`'s thread, which owns ``engine``
    until :meth:`close`; mid-run evaluation uses ``eval_engine``/``eval_env`` (the learner's own weights)."""

    def __init__(self, producer: AsyncProducer, engine, eval_engine, eval_env):
        self.producer, self.engine = producer, engine
        self.eval_engine, self.eval_env = eval_engine, eval_env

    @property
    def version(self) -> int:
        return self.producer.version

    def next_batch(self) -> tuple[RolloutBatch, dict[str, float]]:
        batch, _ = self.producer.next_batch()  # its metrics are the batch's own
        return batch, {}

    def after_update(self, policy) -> None:
        # the version advances even when the update was skipped: the staleness bound counts batches, not updates
        self.producer.publish(policy)  # the engine takes the weights at its switch point

    def snapshot(self) -> dict:
        """The producer's exact state at the learner's version (``producer``: its open groups, partial trajectories,
        counters and stream position; the engine's sampler in ``rng``). If the producer failed before reaching that
        version, the stream with its open groups' questions requeued: a resume loses and repeats no question."""
        rng = capture_rng_state()
        try:
            snap = self.producer.checkpoint_state()
        except ProducerError:
            return {"data": self.producer.data_state(), "rng": rng}
        if snap["sampler"] is not None:
            rng["sampler"] = snap["sampler"]
        return {"data": snap["data"], "rng": rng, "producer": snap["producer"]}

    def step_metrics(self, batch_metrics: dict[str, float], step_seconds: float) -> dict[str, float]:
        idle = batch_metrics.get("async/learner_idle_s", 0.0)
        return {"async/learner_idle_share": idle / step_seconds if step_seconds > 0 else 0.0}

    def progress_fields(self, metrics: dict[str, float]) -> dict[str, Any]:
        # how stale the batch was and who waited for whom
        return {"stale": metrics.get("rollout/staleness_mean", 0.0),
                "idle": f"L{100 * metrics.get('async/learner_idle_share', 0.0):.0f}%/"
                        f"R{100 * metrics.get('async/rollout_idle_share', 0.0):.0f}%"}

    def histograms(self) -> dict[str, list[float]] | None:
        return {"rollout/staleness": self.producer.last_group_staleness}

    def close(self, policy) -> None:
        self.producer.close()
        self.engine.update_weights(policy)  # the final evaluation samples from the trained weights
