"""The asynchronous rollout producer of the local trainer (``rollout.async_producer``, issue 13).

A background thread keeps the rollout engine busy while the learner updates the policy. It runs the same episode
code as the synchronous :func:`~openrlhf_search.rollout.runner.run_rollouts` (``env.reset`` / ``engine.generate`` /
``env.step``, one batched ``generate`` per turn over every live trajectory), but over a *pool* of GRPO groups that
are admitted and finish independently::

    producer thread                                   learner (the trainer's step loop)
    ---------------                                   ---------------------------------
    loop:                                             loop:
      at the turn boundary: apply posted weights        batch = producer.next_batch()   # waits (learner idle)
      admit groups while StalenessBound allows          advantages, old log-probs, update
      one generate over all live rows, env.step         producer.publish(policy)        # version v+1, weights
      finished group -> reward -> (filter) -> done

Scheduling rules (the pure logic lives in :mod:`~openrlhf_search.rollout.async_schedule` and is unit-tested there):

* a group is admitted only while :class:`~openrlhf_search.rollout.async_schedule.StalenessBound` keeps every open
  group able to be consumed within ``max_staleness`` versions of its start tag; the learner takes the ``B`` finished
  groups with the oldest tags and waits for an older running one when it must (nothing is dropped for being slow);
* **partial rollouts** (``partial_rollouts=True``): posted weights are applied at the next turn boundary and the
  trajectories in flight continue under them; every model token is tagged with the version that sampled it
  (``Trajectory.token_versions``), its log-prob is the behaviour log-prob ``+tis``/``+mis`` correct with. Off: an
  update waits until nothing is in flight and admission stops meanwhile (a drain);
* dynamic filtering (DSPO/DAPO) runs as groups finish; a dropped group releases its slot in the bound. If
  ``max_filter_rounds x B`` groups finished since the last batch without filling it, the learner takes what is
  there (a partial batch, ``filter/partial = 1``), the synchronous path's cap;
* the engine samples from its own copy of the weights (``shadow``): the learner keeps training while the engine
  generates, so the two must not share a module. ``publish`` clones the policy's state dict; the producer loads it
  into the shadow at the safe point and calls ``engine.update_weights(shadow)`` (HF: the shadow; vLLM: loaded into
  the vLLM engine).

Checkpoints (``data_state``): the question stream's position plus the stream indices of every admitted, unconsumed
group, which a resumed run serves first, so SIGKILL + ``--resume`` loses and repeats no question (the groups'
partial trajectories are discarded and sampled again). An asynchronous run is not bit-reproducible (thread timing
decides which groups finish first); ``max_staleness = 0`` without this producer is (the synchronous loop).

Accounting: ``generation`` / ``retrieval`` / ``env`` seconds go to the shared :class:`PhaseTimer` from the producer
thread, so in asynchronous runs they overlap the learner's update time; ``async/learner_idle_s`` (the learner
waiting for a batch) and ``async/rollout_idle_s`` (the producer with nothing to run: the bound or a drain stops
admission) are measured per step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from openrlhf_search.algorithms.filtering import mixed_outcome_groups
from openrlhf_search.rollout.async_schedule import StalenessBound, WeightMailbox
from openrlhf_search.rollout.base import SamplingParams
from openrlhf_search.rollout.runner import PhaseTimer, RolloutBatch, _row_budgets


class ProducerError(RuntimeError):
    """The producer thread failed (the original exception is the cause) or stopped making progress."""


@dataclass
class _Group:
    key: int
    """Admission index (unique, increasing)."""
    tag: int
    """Start tag: the engine's policy version when the group was admitted."""
    stream_index: int
    """Index of the question in the training set (requeued on resume if unconsumed)."""
    sample: Any
    trajs: list
    rewards: list[float] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)


class AsyncProducer:
    """Background rollout producer bounded by ``max_staleness`` (see the module docstring).

    Args:
        engine: the rollout engine (used only by the producer thread until :meth:`close`).
        shadow: the engine's own copy of the policy weights (an ``nn.Module`` with the policy's state-dict keys).
        env: a ``SearchEnv`` used only by the producer thread.
        stream: the :class:`~openrlhf_search.trainer.data.QuestionStream` (``take_indexed``).
        score: ``score(trajs) -> (rewards, infos)``.
        batch_size: GRPO groups per learner update ``B`` (``rollout.prompts_per_step``).
        group_size: ``G`` trajectories per group.
        params: sampling parameters of one turn.
        max_staleness: the bound ``eta`` (0: the learner waits for every group of its version).
        partial_rollouts: apply weights between turns (True) or only after a drain (False).
        dynamic_filtering: keep only mixed-outcome groups (DSPO/DAPO).
        max_filter_rounds: the partial-batch cap in units of ``B`` finished groups.
        start_version: the learner's version at start (the step a resumed run starts after).
        timer: accumulates generation/retrieval/env seconds.
        stall_timeout: seconds without any finished group or turn after which :meth:`next_batch` raises.
    """

    def __init__(self, engine, shadow, env, stream, score: Callable, *, batch_size: int, group_size: int,
                 params: SamplingParams, max_staleness: int, partial_rollouts: bool = True,
                 dynamic_filtering: bool = False, max_filter_rounds: int = 3, start_version: int = 0,
                 timer: PhaseTimer | None = None, stall_timeout: float = 600.0):
        self.engine, self.shadow, self.env, self.stream, self.score = engine, shadow, env, stream, score
        self.B, self.G = int(batch_size), int(group_size)
        stops = tuple(dict.fromkeys(tuple(params.stop_strings) + tuple(env.sampling_stop_strings())))
        self.params = replace(params, stop_strings=stops)
        self.bound = StalenessBound(self.B, max_staleness, learner_version=start_version,
                                    consumed=start_version * self.B)
        self.mailbox = WeightMailbox(partial_rollouts=partial_rollouts, engine_version=start_version)
        self.dynamic_filtering, self.max_filter_rounds = dynamic_filtering, max(1, int(max_filter_rounds))
        self.timer = timer or PhaseTimer()
        self.stall_timeout = float(stall_timeout)
        self._cond = threading.Condition()
        self._running: list[_Group] = []
        self._done: list[_Group] = []
        self._next_key = 0
        self._posted_state = None
        self._stop = False
        self._error: BaseException | None = None
        self._progress_t = time.perf_counter()
        # per-period accounting (reset by next_batch)
        self._dropped: list[_Group] = []
        self._finished_since_take = 0
        self._rollout_idle = 0.0
        self._t_period = time.perf_counter()
        self.last_group_staleness: list[int] = []
        """Staleness of each group of the last batch (the TensorBoard histogram)."""
        self.engine.update_weights(self.shadow)
        self._thread = threading.Thread(target=self._run, name="openrlhf-search-rollout-producer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                    self._apply_weights()
                    self._admit()
                    live = [t for g in self._running for t in g.trajs if not t.done]
                    if not live:  # nothing to run: the bound (or a drain) stops admission
                        t0 = time.perf_counter()
                        self._cond.wait(timeout=0.05)
                        self._rollout_idle += time.perf_counter() - t0
                        continue
                    version = self.mailbox.engine_version
                self._turn(live, version)
                self._finish_groups()
        except BaseException as exc:  # handed to the learner, which raises it with context
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _apply_weights(self) -> None:
        in_flight = sum(1 for g in self._running for t in g.trajs if not t.done)
        applied = self.mailbox.maybe_apply(in_flight)
        if applied is not None and self._posted_state is not None:
            self.shadow.load_state_dict(self._posted_state)
            self._posted_state = None
            self.engine.update_weights(self.shadow)

    def _cap_reached(self) -> bool:
        """Dynamic filtering's cap for this batch: ``max_filter_rounds x B`` groups finished without filling it."""
        return (self.dynamic_filtering and len(self._done) < self.B
                and self._finished_since_take >= self.max_filter_rounds * self.B)

    def _admit(self) -> None:
        # at the cap no new group starts for this batch: the learner takes a partial one once the due groups finish
        while (not self.mailbox.blocks_admission() and not self._cap_reached()
               and self.bound.can_start(self.mailbox.engine_version)):
            tag = self.bound.start(self.mailbox.engine_version)
            (index, sample), = self.stream.take_indexed(1)
            t0 = time.perf_counter()
            trajs = self.env.reset([sample] * self.G)
            self.timer.add("env", time.perf_counter() - t0)
            group = _Group(self._next_key, tag, index, sample, trajs)
            for t in trajs:
                t.meta["group_id"] = group.key
                t.token_versions = []
            self._next_key += 1
            self._running.append(group)

    def _turn(self, live: list, version: int) -> None:
        t0 = time.perf_counter()
        prompts = [list(t.prompt_ids) + list(t.response_ids) for t in live]
        budgets = _row_budgets(self.env, live, self.params)
        if budgets is None:
            gens = self.engine.generate(prompts, self.params)
        else:
            gens = self.engine.generate(prompts, replace(self.params, max_new_tokens=max(budgets)),
                                        row_max_new_tokens=budgets)
        self.timer.add("generation", time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.env.step(live, gens)
        for t in live:  # tag what this turn appended: model tokens with the sampling version, observations -1
            new = t.action_mask[len(t.token_versions):]
            t.token_versions.extend(version if m else -1 for m in new)
        self.timer.add("env", time.perf_counter() - t0)
        self._progress_t = time.perf_counter()

    def _finish_groups(self) -> None:
        with self._cond:
            finished = [g for g in self._running if all(t.done for t in g.trajs)]
            self._running = [g for g in self._running if not all(t.done for t in g.trajs)]
        for g in finished:  # scoring outside the lock
            g.rewards, g.infos = self.score(g.trajs)
            for t, info in zip(g.trajs, g.infos):
                t.meta["reward_info"] = info
        with self._cond:
            for g in finished:
                self._finished_since_take += 1
                keep = True
                if self.dynamic_filtering:
                    keep = bool(mixed_outcome_groups(torch.tensor(g.rewards, dtype=torch.float32),
                                                     torch.zeros(len(g.rewards), dtype=torch.long)).all())
                if keep:
                    self._done.append(g)
                else:
                    self.bound.drop(g.tag)
                    self._dropped.append(g)
            if finished:
                self._cond.notify_all()

    # ------------------------------------------------------------------ learner side
    def next_batch(self) -> tuple[RolloutBatch, dict[str, float]]:
        """Wait for and return the next batch (group-major rows) plus the asynchronous metrics of this period."""
        t0 = time.perf_counter()
        with self._cond:
            while True:
                if self._error is not None:
                    raise ProducerError(f"the rollout producer failed: {self._error}") from self._error
                keys = self.bound.take_batch([(g.tag, g.key) for g in self._done], allow_partial=self._cap_reached())
                if keys is not None:
                    break
                if time.perf_counter() - self._progress_t > self.stall_timeout:
                    raise ProducerError(f"the rollout producer made no progress for {self.stall_timeout:.0f} s "
                                        f"({len(self._running)} groups running, {len(self._done)} done)")
                if not self._thread.is_alive():
                    raise ProducerError("the rollout producer thread is not running")
                self._cond.wait(timeout=0.5)
            chosen = {k: None for k in keys}
            groups = [g for g in self._done if g.key in chosen]
            groups.sort(key=lambda g: keys.index(g.key))
            self._done = [g for g in self._done if g.key not in chosen]
            dropped, self._dropped = self._dropped, []
            finished, self._finished_since_take = self._finished_since_take, 0
            rollout_idle, self._rollout_idle = self._rollout_idle, 0.0
            period = time.perf_counter() - self._t_period
            self._t_period = time.perf_counter()
            version = self.bound.learner_version
        learner_idle = time.perf_counter() - t0
        trajs, rewards, gids, infos = [], [], [], []
        for j, g in enumerate(groups):
            trajs += g.trajs
            rewards += list(g.rewards)
            gids += [j] * len(g.trajs)
            infos += list(g.infos)
        all_rewards = rewards + [r for g in dropped for r in g.rewards]
        metrics: dict[str, float] = {
            "filter/keep_ratio": len(groups) / max(1, len(groups) + len(dropped)),
            "filter/partial": float(len(groups) < self.B),
            "reward_all_mean": sum(all_rewards) / max(1, len(all_rewards)),
            "async/learner_idle_s": learner_idle,
            "async/rollout_idle_s": rollout_idle,
            "async/rollout_idle_share": rollout_idle / period if period > 0 else 0.0,
            "async/groups_finished": float(finished),
        }
        self.last_group_staleness = [version - g.tag for g in groups]
        metrics.update(staleness_metrics(self.last_group_staleness, trajs, version))
        every = sorted(groups + dropped, key=lambda g: g.key)
        used = [g.sample.id for g in every]
        sampled = [t for g in every for t in g.trajs] if dropped else []
        sampled_rewards = [r for g in every for r in g.rewards] if dropped else []
        return RolloutBatch(trajs, rewards, gids, infos, metrics, used, sampled, sampled_rewards), metrics

    def publish(self, policy=None) -> int:
        """The learner finished the update on the batch it took: post version ``v + 1`` (and ``policy``'s weights;
        ``None``: the update was skipped, the weights are unchanged)."""
        state = None
        if policy is not None:
            state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        with self._cond:
            version = self.bound.publish()
            self.mailbox.post(version)
            if state is not None:
                self._posted_state = state
            self._cond.notify_all()
        return version

    def data_state(self) -> dict:
        """The question stream's checkpoint state with every admitted, unconsumed group's question requeued."""
        with self._cond:
            state = self.stream.state_dict()
            open_ = sorted(self._running + self._done, key=lambda g: g.key)
            state["requeue"] = [g.stream_index for g in open_] + list(state.get("requeue", []))
            return state

    def engine_rng_state(self, capture: Callable):
        """``capture(generator)`` between turns (the generator is the producer thread's)."""
        with self._cond:
            return capture(getattr(self.engine, "generator", None))

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread (after its current turn) and wait for it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)


def staleness_metrics(group_staleness: list[int], trajs: list, version: int) -> dict[str, float]:
    """Per-step staleness histogram: by group (``learner version - start tag``) and by model token
    (``learner version - the token's sampling version``), plus the share of trajectories sampled by more than one
    version (partial rollouts)."""
    out: dict[str, float] = {}
    if group_staleness:
        out["rollout/staleness_mean"] = sum(group_staleness) / len(group_staleness)
        out["rollout/staleness_max"] = float(max(group_staleness))
        for k in sorted(set(group_staleness)):
            out[f"rollout/staleness_hist_{k}"] = group_staleness.count(k) / len(group_staleness)
    toks = [version - v for t in trajs for v in (getattr(t, "token_versions", None) or []) if v >= 0]
    if toks:
        out["rollout/token_staleness_mean"] = sum(toks) / len(toks)
        out["rollout/token_staleness_max"] = float(max(toks))
    if trajs:
        multi = [len({v for v in (getattr(t, "token_versions", None) or []) if v >= 0}) > 1 for t in trajs]
        out["rollout/partial_share"] = sum(multi) / len(trajs)
    return out
