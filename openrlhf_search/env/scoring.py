"""The reward call of every backend: what a reward sees (:class:`RewardInput`), what it is (:class:`Reward`), and
the only two ways one is called (:func:`run_reward` from synchronous code, :func:`arun_reward` from an event loop).

The environment builds the inputs once per finished trajectory (:func:`reward_inputs`): the question, the answer it
accepted (``Trajectory.answer``), the golden answers, the text it retrieved, the format check it ran (once, kept on
the trajectory), the number of tool calls it executed and the trajectory record. A reward never re-parses the
response to decide the answer or the format.

A reward's ``score_batch`` may be plain or ``async def``; it declares the ``info`` keys it fills (``metrics``: the
environment logs exactly those, so a metric a reward does not compute is absent, not a silent 0) and has a
``timeout`` per batch: a call that does not return in time raises :class:`RewardTimeoutError` naming the reward.
:func:`arun_reward` never blocks its event loop (a plain reward runs in a worker thread), which is what
the OpenRLHF agent's async ``finalize`` needs; :func:`run_reward` runs an async reward on one background loop per
process (kept, so a reward may keep a client session bound to it).

The built-in rewards and their registry are in :mod:`openrlhf_search.rewards`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from openrlhf_search.env.protocol import substring_exact_match
from openrlhf_search.env.trajectory import Trajectory

__all__ = ["RewardInput", "Reward", "RewardError", "RewardTimeoutError", "DEFAULT_TIMEOUT", "run_reward",
           "arun_reward", "reward_inputs", "score_trajectories", "ascore_trajectories", "score_trajectory",
           "RewardBatcher"]


@dataclass(frozen=True)
class RewardInput:
    """What a reward sees of one finished trajectory (built once by the environment)."""

    question: str
    """The question asked (empty when the data gave none)."""
    answer: str | None
    """The answer the environment accepted (``Trajectory.answer``); None when the trajectory gave none."""
    golden_answers: tuple[str, ...]
    """The accepted answers of the question."""
    retrieved_text: str = ""
    """Every observation of an executed tool call (the environment's text, never the model's own blocks)."""
    valid_format: bool = False
    """Whether the response follows the template's protocol (checked once by the environment)."""
    format_error: str | None = None
    """Why it does not (None when valid)."""
    num_tool_calls: int = 0
    """Tool calls the environment executed (searches, opens...)."""
    trajectory: Any = None
    """The :class:`~openrlhf_search.env.trajectory.Trajectory` record (turns, response text, meta), or None."""

    @property
    def retrieval_hit(self) -> bool:
        """A golden answer occurs (token-aligned) in the retrieved text."""
        return bool(self.retrieved_text) and substring_exact_match(self.retrieved_text, self.golden_answers) > 0

    @property
    def response_text(self) -> str:
        """The response as text (model turns and observations), "" without a trajectory."""
        return self.trajectory.response_text if self.trajectory is not None else ""


DEFAULT_TIMEOUT = 300.0
"""Seconds one reward call (one batch) may take before :class:`RewardTimeoutError` (``reward_kwargs.timeout``)."""


class Reward:
    """Base class of rewards: override :meth:`score` (one trajectory) or :meth:`score_batch` (plain or async)."""

    name: str = ""
    """The registry name (set by :func:`get_reward_fn`); error messages use it."""
    metrics: tuple[str, ...] = ()
    """``info`` keys this reward fills with a number for every trajectory (logged as ``search/<key>``)."""
    timeout: float | None = DEFAULT_TIMEOUT
    """Seconds one :meth:`score_batch` call may take (None: no limit)."""

    def score(self, x: RewardInput) -> tuple[float, dict]:
        """``(reward, info)`` of one trajectory."""
        raise NotImplementedError(f"reward {self.name or type(self).__name__!r} defines neither score nor score_batch")

    def score_batch(self, inputs: Sequence[RewardInput]) -> list[tuple[float, dict]]:
        """``[(reward, info), ...]`` in input order; may be an ``async def`` in a subclass."""
        return [self.score(x) for x in inputs]


class RewardError(RuntimeError):
    """A reward that failed its contract (wrong number of results, a non-finite score, a declared metric missing)."""


class RewardTimeoutError(RewardError, TimeoutError):
    """A reward call that did not return within its ``timeout``."""


def _is_async(reward: Reward) -> bool:
    return inspect.iscoroutinefunction(reward.score_batch)


def _timeout_error(reward: Reward, n: int) -> RewardTimeoutError:
    return RewardTimeoutError(
        f"reward {reward.name or type(reward).__name__!r} did not score a batch of {n} trajectories within "
        f"{reward.timeout:g} s (raise env.reward_kwargs.timeout, or make the reward faster)")


def _checked(reward: Reward, out, n: int) -> list[tuple[float, dict]]:
    name = reward.name or type(reward).__name__
    out = list(out)
    if len(out) != n:
        raise RewardError(f"reward {name!r} returned {len(out)} results for {n} trajectories")
    checked = []
    for i, item in enumerate(out):
        try:
            score, info = item
            score = float(score)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward {name!r}: result {i} is not (score, info): {item!r:.200}") from exc
        if not math.isfinite(score):
            raise RewardError(f"reward {name!r}: trajectory {i} scored {score}")
        info = dict(info)
        for key in reward.metrics:
            if not isinstance(info.get(key), (int, float)):
                raise RewardError(f"reward {name!r} declares the metric {key!r} but its info for trajectory {i} "
                                  f"has {info.get(key)!r}")
        checked.append((score, info))
    return checked


_LOOP: list[asyncio.AbstractEventLoop] = []
_LOOP_LOCK = threading.Lock()


def _in_thread(fn, *args) -> concurrent.futures.Future:
    """``fn(*args)`` in a daemon thread: a reward that never returns fails its caller at the timeout and cannot hold
    the process at exit (a pool's worker threads are joined at exit, an event loop's default executor at its end)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    threading.Thread(target=run, name="reward", daemon=True).start()
    return future


def _background_loop() -> asyncio.AbstractEventLoop:
    """One event loop per process for async rewards called from synchronous code (kept, so a reward may keep a
    client session bound to it)."""
    with _LOOP_LOCK:
        if not _LOOP:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="reward-loop", daemon=True).start()
            _LOOP.append(loop)
        return _LOOP[0]


def run_reward(reward: Reward, inputs: Sequence[RewardInput]) -> list[tuple[float, dict]]:
    """Score a batch from synchronous code, within ``reward.timeout`` (async rewards run on a background loop)."""
    inputs = list(inputs)
    if not inputs:
        return []
    if _is_async(reward):
        future = asyncio.run_coroutine_threadsafe(reward.score_batch(inputs), _background_loop())
    elif reward.timeout is None:
        return _checked(reward, reward.score_batch(inputs), len(inputs))
    else:
        future = _in_thread(reward.score_batch, inputs)
    try:
        out = future.result(reward.timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise _timeout_error(reward, len(inputs)) from None
    return _checked(reward, out, len(inputs))


async def arun_reward(reward: Reward, inputs: Sequence[RewardInput]) -> list[tuple[float, dict]]:
    """Score a batch from a running event loop without blocking it: an async reward is awaited, a plain one runs in
    a worker thread; both within ``reward.timeout``."""
    inputs = list(inputs)
    if not inputs:
        return []
    if _is_async(reward):
        call = reward.score_batch(inputs)
    else:
        call = asyncio.wrap_future(_in_thread(reward.score_batch, inputs))
    try:
        out = await asyncio.wait_for(call, reward.timeout)
    except asyncio.TimeoutError:
        raise _timeout_error(reward, len(inputs)) from None
    return _checked(reward, out, len(inputs))



def reward_inputs(trajs: Sequence[Trajectory]) -> list[RewardInput]:
    """The :class:`RewardInput` of each finished trajectory (the format is checked once and kept on it)."""
    out = []
    for t in trajs:
        err = t.check_format()
        out.append(RewardInput(question=str(t.meta.get("question", "")), answer=t.answer,
                               golden_answers=tuple(str(g) for g in t.meta.get("golden_answers", [])),
                               retrieved_text=t.retrieved_text, valid_format=err is None, format_error=err,
                               num_tool_calls=t.num_tool_calls, trajectory=t))
    return out


def score_trajectories(trajs: Sequence[Trajectory], reward: Reward) -> list[tuple[float, dict]]:
    """``(score, info)`` of each trajectory, one batched call of ``reward`` (synchronous callers)."""
    return run_reward(reward, reward_inputs(trajs))


async def ascore_trajectories(trajs: Sequence[Trajectory], reward: Reward) -> list[tuple[float, dict]]:
    """:func:`score_trajectories` from an event loop, without blocking it."""
    return await arun_reward(reward, reward_inputs(trajs))


def score_trajectory(traj: Trajectory, reward: Reward) -> tuple[float, dict]:
    """``(score, info)`` of one trajectory."""
    return score_trajectories([traj], reward)[0]


class RewardBatcher:
    """Scores the trajectories that finish at about the same time in one event loop with one reward call.

    Callers that finish one trajectory each (the OpenRLHF agent's ``finalize``, one task per trajectory) await
    :meth:`score`; the first one opens a window of ``window`` seconds, and the batch is scored when the window closes
    or ``max_batch`` trajectories wait (through :func:`ascore_trajectories`: never blocking the loop, under the
    reward's timeout). An error of the call (a timeout, a broken contract) reaches every trajectory of its batch.
    """

    def __init__(self, reward: Reward, window: float = 0.005, max_batch: int = 64) -> None:
        self.reward = reward
        self.window = float(window)
        self.max_batch = int(max_batch)
        self._pending: list[tuple[Trajectory, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    async def score(self, traj: Trajectory) -> tuple[float, dict]:
        """``(score, info)`` of ``traj``, scored in a batch with the trajectories finishing beside it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((traj, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)  # keep a reference until it is done
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Trajectory, asyncio.Future]]) -> None:
        try:
            results = await ascore_trajectories([t for t, _ in batch], self.reward)
        except BaseException as exc:
            for _, f in batch:
                if not f.done():
                    f.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, f), r in zip(batch, results):
            if not f.done():
                f.set_result(r)
