"""The asynchronous rollout producer of the local trainer (``rollout.async_producer``, issue 13).

A background thread keeps the rollout engine busy while the learner updates the policy. It runs the same episode
code as the synchronous :func:`~openrlhf_search.rollout.runner.run_rollouts` (``env.reset`` / ``engine.generate`` /
``env.step``, one batched ``generate`` per turn over every live trajectory), but over a *pool* of GRPO groups that
are admitted and finish independently::

    producer thread                                       learner (the trainer's step loop)
    ---------------                                       ---------------------------------
    loop, at every turn boundary:                         loop:
      switch point due? wait for the update, apply it       batch = producer.next_batch()   # waits (learner idle)
      B groups finished? form the next batch                advantages, old log-probs, update
      admit groups while StalenessBound allows              producer.publish(policy)        # version v+1, weights
      one generate over all live rows, env.step
      finished group -> reward -> (filter) -> done

Scheduling rules (the pure logic lives in :mod:`~openrlhf_search.rollout.async_schedule` and is unit-tested there):

* a group is admitted only while :class:`~openrlhf_search.rollout.async_schedule.StalenessBound` keeps every open
  group able to be consumed within ``max_staleness`` versions of its start tag; a batch is the ``B`` finished groups
  with the oldest tags, formed by the producer as soon as they are there (it waits for an older running group when
  it must: nothing is dropped for being slow);
* **the switch point** (``weight_sync_turns = k``): the engine takes the weights of the update on batch ``v`` at the
  ``k``-th turn boundary after it formed that batch, or earlier when it has nothing left to run (no live trajectory
  and no admission allowed). If the learner is still updating there, the engine waits for it (``rollout_idle``).
  So generation overlaps the update by up to ``k`` turns, and every decision depends on the producer's own progress,
  never on thread timing: an asynchronous run is bit-reproducible, and a checkpoint can hold its exact state;
* **partial rollouts** (``partial_rollouts=True``): at the switch point the trajectories in flight continue under the
  new weights; every model token is tagged with the version that sampled it (``Trajectory.token_versions``), its
  log-prob is the behaviour log-prob ``+tis``/``+mis`` correct with. Off: from the switch point no group is admitted
  and the new weights are applied once nothing is in flight (a drain);
* dynamic filtering (DSPO/DAPO) runs as groups finish; a dropped group releases its slot in the bound. If
  ``max_filter_rounds x B`` groups finished since the last batch without filling it, the producer forms what is
  there (a partial batch, ``filter/partial = 1``), the synchronous path's cap;
* the engine samples from its own copy of the weights (``shadow``): the learner keeps training while the engine
  generates, so the two must not share a module. ``publish`` clones the policy's state dict; the producer loads it
  into the shadow at the switch point and calls ``engine.update_weights(shadow)`` (HF: the shadow; vLLM: loaded into
  the vLLM engine).

Checkpoints (:meth:`AsyncProducer.checkpoint_state`): the producer's whole state at the switch point of the learner's
version ``v`` -- the running groups with their partial trajectories and version tags, the finished unconsumed
groups, the groups dropped since the last batch, the staleness bound's counters, the question stream's position and
the engine's sampler state. At that point the engine's weights are exactly the learner's version ``v`` (the
checkpoint's weights), so a resumed run continues from it exactly where the uninterrupted run went on (HF engine on
CPU: bit for bit; ``tests/trainer/test_resume_exact.py``). The checkpoint also keeps the stream position with every
open group's question requeued, which a run that cannot use the exact state (another rollout config, a synchronous
resume, a producer that failed before reaching ``v``) serves first: it loses and repeats no question.

Accounting: ``generation`` / ``retrieval`` / ``env`` seconds go to the shared :class:`PhaseTimer` from the producer
thread, so in asynchronous runs they overlap the learner's update time; ``async/learner_idle_s`` (the learner
waiting for a batch) and ``async/rollout_idle_s`` (the producer waiting at a switch point or with nothing to run)
are measured per batch.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from openrlhf_search.algorithms.filtering import mixed_outcome_groups
from openrlhf_search.rollout.async_schedule import StalenessBound, WeightMailbox
from openrlhf_search.rollout.base import SamplingParams
from openrlhf_search.rollout.runner import PhaseTimer, RolloutBatch, _row_budgets

STATE_FORMAT = 1
"""Version of the pickled producer state in checkpoints."""


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


@dataclass
class _Batch:
    """A batch the producer formed for the learner."""

    batch: RolloutBatch
    groups: list
    staleness: list[int]


class AsyncProducer:
    """Background rollout producer bounded by ``max_staleness`` (see the module docstring).

    Args:
        engine: the rollout engine (used only by the producer thread until :meth:`close`).
        shadow: the engine's own copy of the policy weights (an ``nn.Module`` with the policy's state-dict keys).
        env: a ``SearchEnv`` used only by the producer thread.
        stream: the :class:`~openrlhf_search.trainer.data.QuestionStream` (``take_indexed``).
        score: ``score(trajs) -> (rewards, infos)``.
        batch_size: GRPO groups per learner update ``B``.
        group_size: ``G`` trajectories per group.
        params: sampling parameters of one turn.
        max_staleness: the bound ``eta`` (0: the learner waits for every group of its version).
        partial_rollouts: apply weights at the switch point with trajectories in flight (True) or after a drain.
        weight_sync_turns: turns after forming a batch at which the engine takes the update on it (the switch point).
        dynamic_filtering: keep only mixed-outcome groups (DSPO/DAPO).
        max_filter_rounds: the partial-batch cap in units of ``B`` finished groups.
        start_version: the learner's version at start (the step a resumed run starts after).
        timer: accumulates generation/retrieval/env seconds.
        stall_timeout: seconds without any finished group or turn after which :meth:`next_batch` raises.
        state: :meth:`checkpoint_state`'s ``producer`` entry of the checkpoint a resumed run starts from (the engine's
            sampler and the weights are restored by the caller); taken with another configuration it is ignored with
            a message, and the stream's requeued questions are served instead.
    """

    def __init__(self, engine, shadow, env, stream, score: Callable, *, batch_size: int, group_size: int,
                 params: SamplingParams, max_staleness: int, partial_rollouts: bool = True,
                 weight_sync_turns: int = 4, dynamic_filtering: bool = False, max_filter_rounds: int = 3,
                 start_version: int = 0, timer: PhaseTimer | None = None, stall_timeout: float = 600.0,
                 state: bytes | None = None):
        if weight_sync_turns < 0:
            raise ValueError(f"weight_sync_turns={weight_sync_turns}: expected >= 0")
        self.engine, self.shadow, self.env, self.stream, self.score = engine, shadow, env, stream, score
        self.B, self.G = int(batch_size), int(group_size)
        stops = tuple(dict.fromkeys(tuple(params.stop_strings) + tuple(env.sampling_stop_strings())))
        self.params = replace(params, stop_strings=stops)
        self.partial_rollouts, self.weight_sync_turns = bool(partial_rollouts), int(weight_sync_turns)
        self.bound = StalenessBound(self.B, max_staleness, learner_version=start_version,
                                    consumed=start_version * self.B)
        """Driven by the producer: ``learner_version`` is the version the engine applied (its switch points)."""
        self.mailbox = WeightMailbox(partial_rollouts=partial_rollouts, engine_version=start_version)
        self.dynamic_filtering, self.max_filter_rounds = dynamic_filtering, max(1, int(max_filter_rounds))
        self.timer = timer or PhaseTimer()
        self.stall_timeout = float(stall_timeout)
        self.version = int(start_version)
        """The learner's version: updates published (the version the next batch is trained at)."""
        self._cond = threading.Condition()
        self._running: list[_Group] = []
        self._done: list[_Group] = []
        self._dropped: list[_Group] = []  # dropped by the filter since the last batch (reported with the next one)
        self._finished_since_take = 0
        self._next_key = 0
        self._ready: _Batch | None = None  # formed, not yet taken by the learner
        self._awaiting = False  # a batch was formed; the update on it is not applied yet
        self._draining = False  # the switch point is due: no admission until the weights are applied
        self._turns_since_take = 0
        self._posted_state = None
        self._stop = False
        self._error: BaseException | None = None
        self._progress_t = time.perf_counter()
        self._rollout_idle = 0.0
        self._t_period = time.perf_counter()
        self.last_group_staleness: list[int] = []
        """Staleness of each group of the last batch (the TensorBoard histogram)."""
        self.restore_note = self._restore(state) if state is not None else None
        """Why the checkpoint's producer state could not be used (None: used, or none given)."""
        self.engine.update_weights(self.shadow)
        self._snapshot = self._capture()
        self._thread = threading.Thread(target=self._run, name="openrlhf-search-rollout-producer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ checkpoint state
    def _config(self) -> dict:
        return {"batch_size": self.B, "group_size": self.G, "max_staleness": self.bound.max_staleness,
                "partial_rollouts": self.partial_rollouts, "weight_sync_turns": self.weight_sync_turns,
                "dynamic_filtering": self.dynamic_filtering, "max_filter_rounds": self.max_filter_rounds}

    def _capture(self) -> dict:
        """The state at a switch point (under the lock): what :meth:`checkpoint_state` returns for this version."""
        b = self.bound
        state = {"format": STATE_FORMAT, "version": b.learner_version, "config": self._config(),
                 "bound": {"started": b.started, "consumed": b.consumed, "dropped": b.dropped,
                           "open_tags": dict(b.open_tags)},
                 "running": self._running, "done": self._done, "dropped": self._dropped,
                 "finished_since_take": self._finished_since_take, "next_key": self._next_key,
                 "stream": self.stream.state_dict()}
        gen = getattr(self.engine, "generator", None)
        return {"version": b.learner_version, "producer": pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL),
                "data": self._requeue_state(), "sampler": gen.get_state() if gen is not None else None}

    def _restore(self, blob: bytes) -> str | None:
        state = pickle.loads(blob)
        if state.get("format") != STATE_FORMAT:
            return f"state format {state.get('format')} (this version reads {STATE_FORMAT})"
        if state["version"] != self.version:
            return f"state of version {state['version']}, the run resumes at version {self.version}"
        diff = {k: (v, self._config().get(k)) for k, v in state["config"].items() if self._config().get(k) != v}
        if diff:
            return "taken with another rollout config: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        b = state["bound"]
        self.bound.started, self.bound.consumed, self.bound.dropped = b["started"], b["consumed"], b["dropped"]
        self.bound.open_tags = Counter(b["open_tags"])
        self._running, self._done, self._dropped = state["running"], state["done"], state["dropped"]
        self._finished_since_take, self._next_key = state["finished_since_take"], state["next_key"]
        self.stream.load_state_dict(state["stream"])
        return None

    def _requeue_state(self) -> dict:
        """The stream's state with every admitted, unconsumed group's question requeued (under the lock)."""
        state = self.stream.state_dict()
        open_ = self._running + self._done + (self._ready.groups if self._ready is not None else [])
        state["requeue"] = [g.stream_index for g in sorted(open_, key=lambda g: g.key)] + list(state["requeue"])
        return state

    def checkpoint_state(self) -> dict:
        """The exact state at the switch point of the learner's current version, waiting for the engine to reach it
        (it needs no further batch from the learner): ``{"version", "producer" (bytes: the ``state`` argument of a
        resumed run), "data" (the stream with the open groups requeued), "sampler" (the engine's RNG or None)}``.

        Raises :class:`ProducerError` if the producer failed or stalled before reaching that version."""
        with self._cond:
            while self._snapshot["version"] != self.version:
                self._check_alive("reaching the learner's version for a checkpoint")
                self._cond.wait(timeout=0.5)
            return dict(self._snapshot)

    def data_state(self) -> dict:
        """The question stream's state now with every admitted, unconsumed group's question requeued."""
        with self._cond:
            return self._requeue_state()

    # ------------------------------------------------------------------ producer thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                    self._form_batch()  # (k = 0: the switch point is right after forming the batch)
                    if not self._switch_weights():
                        return
                    self._form_batch()  # the next batch may be there as soon as its version is applied
                    self._admit()
                    live = self._live()
                    if not live:
                        if not self._awaiting:  # nothing formed and nothing to run: only a stall gets here
                            t0 = time.perf_counter()
                            self._cond.wait(timeout=0.05)
                            self._rollout_idle += time.perf_counter() - t0
                        continue  # (awaiting: the switch point is due now)
                    version = self.mailbox.engine_version
                self._turn(live, version)
                self._finish_groups()
                if self._awaiting:
                    self._turns_since_take += 1
        except BaseException as exc:  # handed to the learner, which raises it with context
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _live(self) -> list:
        return [t for g in self._running for t in g.trajs if not t.done]

    def _can_admit(self) -> bool:
        return (not self._draining and not self._cap_reached()
                and self.bound.can_start(self.mailbox.engine_version))

    def _switch_weights(self) -> bool:
        """At the switch point, wait for the learner's update and apply it (under the lock); False: stop."""
        if not self._awaiting:
            return True
        if not self._draining and (self._turns_since_take >= self.weight_sync_turns
                                   or not (self._live() or self._can_admit())):
            self._draining = True  # the switch point: no admission until the weights are applied
        if not self._draining or (not self.partial_rollouts and self._live()):
            return True  # (partial rollouts off: the drain goes on)
        t0 = time.perf_counter()
        while self.mailbox.pending is None:  # the learner is still updating
            if self._stop:
                return False
            self._cond.wait(timeout=0.5)
        self._rollout_idle += time.perf_counter() - t0
        self.mailbox.maybe_apply(len(self._live()))
        if self._posted_state is not None:  # None: the update was skipped, the weights are unchanged
            self.shadow.load_state_dict(self._posted_state)
            self._posted_state = None
            self.engine.update_weights(self.shadow)
        self.bound.publish()
        self._awaiting = self._draining = False
        self._progress_t = time.perf_counter()
        self._snapshot = self._capture()
        self._cond.notify_all()
        return True

    def _cap_reached(self) -> bool:
        """Dynamic filtering's cap for this batch: ``max_filter_rounds x B`` groups finished without filling it."""
        return (self.dynamic_filtering and len(self._done) < self.B
                and self._finished_since_take >= self.max_filter_rounds * self.B)

    def _admit(self) -> None:
        # at the cap no new group starts for this batch: the batch is formed partial once the due groups finish
        while self._can_admit():
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
        finished = [g for g in self._running if all(t.done for t in g.trajs)]  # (only this thread changes them)
        for g in finished:  # scoring outside the lock; the groups stay in _running until scored (data_state)
            g.rewards, g.infos = self.score(g.trajs)
            for t, info in zip(g.trajs, g.infos):
                t.meta["reward_info"] = info
        with self._cond:
            keys = {g.key for g in finished}
            self._running = [g for g in self._running if g.key not in keys]
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

    def _form_batch(self) -> None:
        """Form the next batch when its groups are there (under the lock; the engine is at the batch's version)."""
        if self._awaiting or self._ready is not None:
            return
        keys = self.bound.take_batch([(g.tag, g.key) for g in self._done], allow_partial=self._cap_reached())
        if keys is None:
            return
        chosen = {k: None for k in keys}
        groups = sorted((g for g in self._done if g.key in chosen), key=lambda g: keys.index(g.key))
        self._done = [g for g in self._done if g.key not in chosen]
        dropped, self._dropped = self._dropped, []
        finished, self._finished_since_take = self._finished_since_take, 0
        rollout_idle, self._rollout_idle = self._rollout_idle, 0.0
        period = time.perf_counter() - self._t_period
        self._t_period = time.perf_counter()
        version = self.bound.learner_version
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
            "async/rollout_idle_s": rollout_idle,
            "async/rollout_idle_share": rollout_idle / period if period > 0 else 0.0,
            "async/groups_finished": float(finished),
        }
        staleness = [version - g.tag for g in groups]
        metrics.update(staleness_metrics(staleness, trajs, version))
        every = sorted(groups + dropped, key=lambda g: g.key)
        used = [g.sample.id for g in every]
        sampled = [t for g in every for t in g.trajs] if dropped else []
        sampled_rewards = [r for g in every for r in g.rewards] if dropped else []
        batch = RolloutBatch(trajs, rewards, gids, infos, metrics, used, sampled, sampled_rewards)
        self._ready = _Batch(batch, groups, staleness)
        self._awaiting, self._turns_since_take = True, 0
        self._cond.notify_all()

    # ------------------------------------------------------------------ learner side
    def _check_alive(self, doing: str) -> None:
        if self._error is not None:
            raise ProducerError(f"the rollout producer failed: {self._error}") from self._error
        if time.perf_counter() - self._progress_t > self.stall_timeout:
            raise ProducerError(f"the rollout producer made no progress for {self.stall_timeout:.0f} s {doing} "
                                f"({len(self._running)} groups running, {len(self._done)} done)")
        if not self._thread.is_alive():
            raise ProducerError(f"the rollout producer thread is not running ({doing})")

    def next_batch(self) -> tuple[RolloutBatch, dict[str, float]]:
        """Wait for and return the next batch (group-major rows) plus the asynchronous metrics of this period."""
        t0 = time.perf_counter()
        with self._cond:
            while self._ready is None:
                self._check_alive("forming the next batch")
                self._cond.wait(timeout=0.5)
            ready, self._ready = self._ready, None
        ready.batch.metrics["async/learner_idle_s"] = time.perf_counter() - t0
        self.last_group_staleness = ready.staleness
        return ready.batch, ready.batch.metrics

    def publish(self, policy=None) -> int:
        """The learner finished the update on the batch it took: post version ``v + 1`` (and ``policy``'s weights;
        ``None``: the update was skipped, the weights are unchanged). The engine takes it at its switch point."""
        state = None
        if policy is not None:
            state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        with self._cond:
            self.version += 1
            self.mailbox.post(self.version)
            self._progress_t = time.perf_counter()  # the producer may have waited for this update
            if state is not None:
                self._posted_state = state
            self._cond.notify_all()
        return self.version

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread, once the engine reached the learner's last version (so its checkpoint state can still
        be taken) unless the producer failed, and wait for it."""
        deadline = time.perf_counter() + timeout
        with self._cond:
            while (self._snapshot["version"] != self.version and self._error is None and self._thread.is_alive()
                   and time.perf_counter() < deadline):
                self._cond.wait(timeout=0.1)
            self._stop = True
            self._cond.notify_all()
        self._thread.join(max(1.0, deadline - time.perf_counter()))


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
