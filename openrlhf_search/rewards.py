"""Outcome rewards for search agents: the registry and the built-in rewards.

**The protocol** lives in :mod:`openrlhf_search.env.scoring` (re-exported here): a reward receives one
:class:`RewardInput` per finished trajectory, built by the environment (the question, the answer the environment
accepted, the golden answers, the retrieved text, the format check it ran once, the executed tool calls, the
trajectory record); it is a :class:`Reward` whose ``score_batch`` may be plain or ``async``, declares the ``info``
keys it fills (``metrics``) and has a ``timeout`` (``reward_kwargs: {timeout: ...}``); :func:`run_reward` and
:func:`arun_reward` are the only two ways one is called. The tag grammar and the answer metrics live in the leaf
:mod:`openrlhf_search.env.protocol` (also re-exported here: ``normalize_answer``, ``exact_match``,
``substring_exact_match``, ``f1_score``, ``extract_answer``).

**Built-in rewards** (``env.reward``): ``em``, ``subem``, ``f1`` (the metric of the accepted answer), and the
format-aware ``format_em``, ``format_f1``, ``f1_x_format`` (:class:`FormatRewardWeights`). With ``m`` in [0, 1]
the answer metric, a *correct* answer is ``m = 1``; with ``x`` the format outcome (valid or not)::

    correct:  r = correct_x
    wrong:    r = wrong_x + (correct_x - wrong_x - retrieval_score - no_search_penalty) * m
                + retrieval_score      if a golden answer occurs in the retrieved text
    then      r -= no_search_penalty   if the trajectory made no tool call

so at equal format a correct answer always scores strictly more than any wrong one, whatever was retrieved and
whether it searched (the wrong band stays below ``correct_x - no_search_penalty``), and a correct answer in a
valid response outranks every wrong answer. With ``retrieval_score = no_search_penalty = 0`` this is Search-R1's
structured reward (``valid & correct = 1``, ``correct but invalid format = 0.8``, ``valid but wrong = 0.1``,
``invalid and wrong = 0`` for EM). The weights are checked when the reward is built.

Pure Python on purpose (no torch import): the reward runs inside rollout workers and the HTTP-free tests.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

from openrlhf_search.env.protocol import (
    exact_match,
    extract_answer,
    f1_score,
    normalize_answer,
    substring_exact_match,
)
from openrlhf_search.env.protocol import format_error as _format_error
from openrlhf_search.env.scoring import (
    DEFAULT_TIMEOUT,
    Reward,
    RewardError,
    RewardInput,
    RewardTimeoutError,
    arun_reward,
    run_reward,
)
from openrlhf_search.env.tools import tool_names
from openrlhf_search.registry import Registry

__all__ = [
    "normalize_answer",
    "exact_match",
    "substring_exact_match",
    "f1_score",
    "extract_answer",
    "is_valid_format",
    "format_error",
    "RewardInput",
    "Reward",
    "RewardError",
    "RewardTimeoutError",
    "run_reward",
    "arun_reward",
    "answer_info",
    "FormatRewardWeights",
    "REWARDS",
    "register_reward",
    "get_reward_fn",
    "available_rewards",
    "DEFAULT_TIMEOUT",
]


def format_error(response_text: str, protocol: str = "tags", tools=None) -> str | None:
    """Why ``response_text`` breaks the protocol, or None (:func:`openrlhf_search.env.protocol.format_error`);
    ``tools=None`` accepts every registered tool as a call."""
    if tools is None:
        tools = sorted(tool_names(), key=lambda n: (n != "search", n))  # the first tool first in messages
    return _format_error(response_text, protocol, tools)


def is_valid_format(response_text: str, protocol: str = "tags", tools=None) -> bool:
    """True when the response follows the protocol (see :func:`format_error`)."""
    return format_error(response_text, protocol, tools) is None


# ---------------------------------------------------------------------------------------------------- registry
REWARDS: Registry[Callable[..., Reward]] = Registry("reward")
"""Reward *factories* by name: ``factory(**reward_kwargs) -> Reward``."""


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Register a reward *factory* ``factory(**reward_kwargs) -> Reward`` (a name taken twice raises ``KeyError``).

    A factory may still return a plain function ``fn(response_text, golden_answers, retrieved_text="", *, answer)
    -> (score, info)`` (the earlier protocol): it is wrapped, and declares the metrics listed in ``fn.metrics``."""
    return REWARDS.register(name)


def available_rewards() -> list[str]:
    """Names accepted by :func:`get_reward_fn`."""
    return REWARDS.names()


class _FunctionReward(Reward):
    """A plain ``fn(response_text, golden_answers, retrieved_text, *, answer)`` as a :class:`Reward`."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.metrics = tuple(getattr(fn, "metrics", ()))

    def score(self, x: RewardInput) -> tuple[float, dict]:
        return self.fn(x.response_text, list(x.golden_answers), x.retrieved_text, answer=x.answer)


def get_reward_fn(name: str, **cfg) -> Reward:
    """Build the reward registered under ``name`` with ``cfg`` (``env.reward_kwargs``).

    ``timeout`` (seconds per batch, or None) is accepted by every reward; the other keys go to the factory.
    """
    timeout = cfg.pop("timeout", Reward.timeout)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"reward {name!r}: timeout must be a positive number of seconds or null, got {timeout!r}")
    made = REWARDS.get(name)(**cfg)
    if not isinstance(made, Reward):
        if not callable(made):
            raise TypeError(f"reward {name!r}: the factory returned {type(made).__name__}, not a Reward")
        made = _FunctionReward(made)
    made.name = name
    made.timeout = None if timeout is None else float(timeout)
    return made


# ------------------------------------------------------------------------------------------------ built-in rewards
ANSWER_METRICS = ("em", "subem", "f1")
"""The metrics every built-in reward fills."""


def answer_info(x: RewardInput) -> dict:
    """The built-in rewards' info: the answer, its metrics and the environment's checks."""
    golds = list(x.golden_answers)
    return {
        "answer": x.answer,
        "em": exact_match(x.answer, golds),
        "subem": substring_exact_match(x.answer, golds),
        "f1": f1_score(x.answer, golds),
        "valid_format": x.valid_format,
        "format_error": x.format_error,
        "retrieval_hit": x.retrieval_hit,
    }


class MetricReward(Reward):
    """The metric (``em``, ``subem`` or ``f1``) of the accepted answer, whatever the format."""

    metrics = ANSWER_METRICS

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def score(self, x: RewardInput) -> tuple[float, dict]:
        info = answer_info(x)
        return float(info[self.metric]), info


def _plain(metric: str) -> Callable[..., Reward]:
    def factory(**cfg) -> Reward:
        if cfg:
            raise TypeError(f"reward {metric!r} takes no options, got {sorted(cfg)}")
        return MetricReward(metric)

    return factory


for _m in ANSWER_METRICS:
    register_reward(_m)(_plain(_m))


@dataclass(frozen=True)
class FormatRewardWeights:
    """Weights of the format-aware rewards (formula in the module docstring). Checked when built: at equal format a
    correct answer must outscore every wrong one, so ``correct_x - wrong_x`` must exceed ``retrieval_score +
    no_search_penalty`` for both formats (or equal 0 or more when both are 0)."""

    correct_valid: float = 1.0
    """Reward of a correct answer in a well-formed response (the maximum)."""
    correct_invalid: float = 0.8
    """Reward of a correct answer whose response breaks the protocol (at most ``correct_valid``)."""
    wrong_valid: float = 0.1
    """Reward of a wrong (or missing) answer in a well-formed response: a little credit for the format."""
    wrong_invalid: float = 0.0
    """Reward of a wrong answer in a malformed response."""
    retrieval_score: float = 0.0
    """Credit for a wrong answer when a golden answer occurs in the retrieved text (0 = off). A correct answer gets
    no more than ``correct_x``: the partial credit of wrong answers shrinks to leave room for it."""
    no_search_penalty: float = 0.0
    """Subtracted from every trajectory that executed no tool call (answered without searching; 0 = off)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"reward option {f.name} must be a finite number, got {v!r}")
        for key in ("retrieval_score", "no_search_penalty"):
            if getattr(self, key) < 0:
                raise ValueError(f"reward option {key} must be >= 0, got {getattr(self, key)}")
        if self.correct_valid < self.correct_invalid:
            raise ValueError(f"reward options: correct_valid ({self.correct_valid}) must be >= correct_invalid "
                             f"({self.correct_invalid})")
        extra = self.retrieval_score + self.no_search_penalty
        for fmt in ("valid", "invalid"):
            c, w = getattr(self, f"correct_{fmt}"), getattr(self, f"wrong_{fmt}")
            if c - w < 0 or (extra > 0 and c - w <= extra):
                raise ValueError(
                    f"reward options: correct_{fmt} - wrong_{fmt} = {c - w:g} must be "
                    + (f"greater than retrieval_score + no_search_penalty = {extra:g}" if extra > 0 else ">= 0")
                    + ", or a wrong answer could reach a correct one's reward")

    def reward(self, m: float, valid: bool, hit: bool, searched: bool) -> float:
        """The reward of a trajectory with answer metric ``m``, format ``valid``, retrieval ``hit``, ``searched``."""
        c, w = (self.correct_valid, self.wrong_valid) if valid else (self.correct_invalid, self.wrong_invalid)
        if m >= 1.0:
            r = c
        else:
            r = w + (c - w - self.retrieval_score - self.no_search_penalty) * m
            r += self.retrieval_score if hit else 0.0
        return r - (0.0 if searched else self.no_search_penalty)


_RENAMED = {"retrieval_bonus": "retrieval_score"}
_REMOVED = {
    "protocol": "the environment checks the format once, with its template's protocol",
    "tools": "the environment checks the format once, with its env.tools list",
}


def _make_weights(reward: str, cfg: dict, defaults: dict | None = None) -> FormatRewardWeights:
    cfg = dict(cfg)
    for old, new in _RENAMED.items():
        if old in cfg:
            if new in cfg:
                raise TypeError(f"reward {reward!r}: give {new!r} only ({old!r} is its old name)")
            warnings.warn(f"reward option {old!r} is deprecated, use {new!r} (env.reward_kwargs.{new}): the same "
                          "credit for a wrong answer whose golden answer was retrieved, which can no longer lift it "
                          "to a correct answer's reward", FutureWarning, stacklevel=3)
            cfg[new] = cfg.pop(old)
    for old, why in _REMOVED.items():
        if old in cfg:
            raise TypeError(f"reward {reward!r}: option {old!r} was removed ({why})")
    valid = {f.name for f in fields(FormatRewardWeights)}
    unknown = set(cfg) - valid
    if unknown:
        raise TypeError(f"unknown reward option(s) {sorted(unknown)}; valid: {sorted(valid | {'timeout'})}")
    return FormatRewardWeights(**{**(defaults or {}), **cfg})


class FormatReward(Reward):
    """An answer metric combined with the environment's format check, retrieval and search (formula above)."""

    metrics = ANSWER_METRICS

    def __init__(self, metric: str, weights: FormatRewardWeights) -> None:
        self.metric = metric
        self.weights = weights

    def score(self, x: RewardInput) -> tuple[float, dict]:
        info = answer_info(x)
        r = self.weights.reward(float(info[self.metric]), x.valid_format, info["retrieval_hit"], x.num_tool_calls > 0)
        return float(r), info


def _format_reward(name: str, metric: str, defaults: dict | None = None) -> Callable[..., Reward]:
    def factory(**cfg) -> Reward:
        return FormatReward(metric, _make_weights(name, cfg, defaults))

    return factory


register_reward("format_em")(_format_reward("format_em", "em"))
register_reward("format_f1")(_format_reward("format_f1", "f1"))
# CalibAdv's default reward: F1 when the format is valid, else 0 (``F1 x format``).
register_reward("f1_x_format")(_format_reward(
    "f1_x_format", "f1", {"correct_valid": 1.0, "correct_invalid": 0.0, "wrong_valid": 0.0, "wrong_invalid": 0.0}))
