"""The multi-turn batched rollout driver.

One RL step's sampling, turn by turn over the whole batch::

    trajs = env.reset(G copies of each question)            # prompt ids, group ids
    while some trajectory is live:
        gens = engine.generate(live prompts + responses)     # ONE batched generate per turn
        env.step(live, gens)                                 # parse actions, ONE retriever.search per turn,
                                                             # append tokenised observations (masked)

Dynamic filtering (DSPO / DAPO) wraps this in :func:`collect_groups`: sample rounds of questions, score them, keep
only groups with mixed outcomes (``algorithms.GroupBatcher``) until the batch holds ``target_groups`` groups or the
round cap is reached (then a partial batch, logged).

Time is accounted per phase (:class:`PhaseTimer`): generation (engine calls), retrieval (the retriever, through
:class:`TimedRetriever`), and the rest of the environment step is counted as "env".
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from openrlhf_search.algorithms.filtering import GroupBatcher
from openrlhf_search.rollout.base import Engine, SamplingParams


@dataclass
class PhaseTimer:
    """Wall-clock seconds accumulated per phase."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, dt: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + dt

    def reset(self) -> dict[str, float]:
        """Return the accumulated seconds and start from zero."""
        out, self.seconds = self.seconds, {}
        return out


class TimedRetriever:
    """Wraps a ``Retriever`` and books the time of every ``search`` (and ``get_documents``, the ``open`` tool's)
    call under ``"retrieval"``."""

    def __init__(self, inner, timer: PhaseTimer):
        self.inner = inner
        self.timer = timer
        self.calls = 0
        if not callable(getattr(inner, "get_documents", None)):
            self.get_documents = None  # the wrapped retriever cannot serve the ``open`` tool: do not pretend it can

    def search(self, queries: list[str], topk: int = 3):
        t0 = time.perf_counter()
        try:
            return self.inner.search(queries, topk)
        finally:
            self.calls += 1
            self.timer.add("retrieval", time.perf_counter() - t0)

    def get_documents(self, ids_or_titles: list[str]):
        t0 = time.perf_counter()
        try:
            return self.inner.get_documents(ids_or_titles)
        finally:
            self.calls += 1
            self.timer.add("retrieval", time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _is_done(traj) -> bool:
    return bool(getattr(traj, "done", False))


def run_rollouts(engine: Engine, env, samples: Sequence[Any], group_size: int, params: SamplingParams,
                 timer: PhaseTimer | None = None, group_offset: int = 0) -> list:
    """Roll out ``group_size`` trajectories per sample, all turns batched.

    Args:
        engine: any :class:`~openrlhf_search.rollout.base.Engine`.
        env: a ``SearchEnv`` (``reset``, ``step``, ``sampling_stop_strings``).
        samples: questions (``QASample``).
        group_size: G, copies per question; copies of sample ``j`` get group id ``group_offset + j``.
        params: sampling parameters of one turn (stop strings of the environment are added).
        timer: accumulates ``generation`` (and ``retrieval`` via :class:`TimedRetriever`) and ``env`` seconds.

    Returns:
        The trajectories, sample-major (``G`` consecutive trajectories per sample), each with
        ``meta["group_id"]``.
    """
    timer = timer or PhaseTimer()
    expanded = [s for s in samples for _ in range(group_size)]
    t0 = time.perf_counter()
    trajs = env.reset(expanded)
    for i, traj in enumerate(trajs):
        traj.meta["group_id"] = group_offset + i // group_size
    stops = tuple(dict.fromkeys(tuple(params.stop_strings) + tuple(env.sampling_stop_strings())))
    params = replace(params, stop_strings=stops)
    timer.add("env", time.perf_counter() - t0)
    while True:
        live = [t for t in trajs if not _is_done(t)]
        if not live:
            break
        t0 = time.perf_counter()
        prompts = [list(t.prompt_ids) + list(t.response_ids) for t in live]
        budgets = _row_budgets(env, live, params)
        if budgets is None:
            gens = engine.generate(prompts, params)
        else:
            gens = engine.generate(prompts, replace(params, max_new_tokens=max(budgets)), row_max_new_tokens=budgets)
        timer.add("generation", time.perf_counter() - t0)
        t0 = time.perf_counter()
        env.step(live, gens)
        timer.add("env", time.perf_counter() - t0)
    return trajs


def _row_budgets(env, live, params: SamplingParams) -> list[int] | None:
    """Per-row token budgets of this turn (``env.turn_budget`` capped by ``max_new_tokens``), or ``None`` when the
    environment does not expose budgets or no row is below the cap."""
    budget = getattr(env, "turn_budget", None)
    if budget is None:
        return None
    rows = [max(1, min(params.max_new_tokens, int(budget(t)))) for t in live]
    return None if all(b == params.max_new_tokens for b in rows) else rows


@dataclass
class RolloutBatch:
    """The trajectories of one RL step, with their rewards and group ids (rows in group order)."""

    trajectories: list
    rewards: list[float]
    group_ids: list[int]
    reward_infos: list[dict]
    metrics: dict[str, float]
    samples_used: list[str]
    """Ids of every question sampled in this step (kept or filtered), in order."""
    sampled: list = field(default_factory=list)
    """Every trajectory sampled in this step, kept or dropped by dynamic filtering (group-major; its reward info is
    ``t.meta["reward_info"]``); empty means ``trajectories`` (nothing was filtered)."""
    sampled_rewards: list[float] = field(default_factory=list)
    """The rewards of ``sampled``, row for row."""

    @property
    def all_trajectories(self) -> list:
        """Every trajectory the step sampled (kept or not): what the step's statistics and samples describe."""
        return self.sampled or self.trajectories

    @property
    def all_rewards(self) -> list[float]:
        """The rewards of :attr:`all_trajectories`, row for row."""
        return self.sampled_rewards if self.sampled else self.rewards


def collect_groups(engine: Engine, env, next_samples: Callable[[int], list], score: Callable[[list], tuple],
                   target_groups: int, group_size: int, params: SamplingParams, dynamic_filtering: bool,
                   max_rounds: int = 3, timer: PhaseTimer | None = None) -> RolloutBatch:
    """Sample until the batch holds ``target_groups`` groups (mixed-outcome groups only when filtering).

    Args:
        next_samples: ``next_samples(k)`` returns the next ``k`` questions of the data stream.
        score: ``score(trajs) -> (rewards: list[float], infos: list[dict])``.
        dynamic_filtering: DSPO/DAPO filtering; without it one round of ``target_groups`` questions is used as is.
        max_rounds: the cap of filtering rounds; when reached, the (partial) batch is returned and
            ``filter/partial`` is 1 in the metrics.

    The number of questions drawn in a round after the first is the missing group count divided by the keep
    ratio observed so far (at most ``2 * target_groups``), DAPO-style oversampling.
    """
    timer = timer or PhaseTimer()
    used: list[str] = []
    if not dynamic_filtering:
        samples = next_samples(target_groups)
        used += [s.id for s in samples]
        trajs = run_rollouts(engine, env, samples, group_size, params, timer)
        rewards, infos = score(trajs)
        for t, info in zip(trajs, infos):
            t.meta["reward_info"] = info
        gids = [t.meta["group_id"] for t in trajs]
        return RolloutBatch(trajs, list(rewards), gids, infos, {"filter/keep_ratio": 1.0, "filter/rounds": 1.0}, used)

    batcher = GroupBatcher(target_groups=target_groups, max_rounds=max_rounds, on_cap="partial")
    all_rewards: list[float] = []
    all_trajs: list = []
    offset = 0
    while not batcher.done:
        missing = target_groups - batcher.report.kept_groups
        ratio = batcher.report.keep_ratio if batcher.report.rounds else 1.0
        k = target_groups if not batcher.report.rounds else min(2 * target_groups,
                                                                math.ceil(missing / max(ratio, 0.25)))
        samples = next_samples(k)
        used += [s.id for s in samples]
        trajs = run_rollouts(engine, env, samples, group_size, params, timer, group_offset=offset)
        offset += len(samples)
        rewards, infos = score(trajs)
        all_rewards += list(rewards)
        all_trajs += trajs
        for t, info in zip(trajs, infos):
            t.meta["reward_info"] = info
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # partial batches are reported in the metrics
            batcher.add(torch.tensor(rewards, dtype=torch.float32),
                        torch.tensor([t.meta["group_id"] for t in trajs]), trajs)
    metrics = batcher.report.as_metrics()
    metrics["reward_all_mean"] = sum(all_rewards) / max(1, len(all_rewards))
    if batcher.report.kept_groups == 0:
        return RolloutBatch([], [], [], [], metrics, used, all_trajs, all_rewards)
    batch = batcher.result()
    return RolloutBatch(batch.items, batch.rewards.tolist(), batch.group_ids.tolist(),
                        [t.meta.get("reward_info", {}) for t in batch.items], metrics, used, all_trajs, all_rewards)
