"""A run that cannot learn says so, early: the learning-signal check of the local trainer.

Group-relative RL learns only from groups whose samples scored differently: a group where every sample earned the
same reward has advantage 0 everywhere (GRPO updates on nothing), and DSPO/DAPO's filter drops it (no update at all).
A model that never writes an accepted ``<answer>`` earns the same reward on every sample, so a run on user data with
a model that cannot yet follow the protocol looks busy and learns nothing. :class:`SignalMonitor` watches every
sampled trajectory of every step (kept or filtered) and, once :data:`PATIENCE` consecutive steps had no signal,
prints one warning with the likely cause and what to try; the end-of-run summary repeats it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

PATIENCE = 5
"""Consecutive steps without a learning signal before the warning (the issue it answers asks for <= 10)."""


@dataclass
class StepSignal:
    """What one step's samples said about the learning signal."""

    flat_groups: int
    """Groups whose samples all earned the same reward (advantage 0)."""
    groups: int
    answered: float
    """Share of trajectories that ended with an accepted answer."""
    valid_format: float | None
    """Share of trajectories whose response the reward called well-formed (``None``: the reward does not say)."""
    reward_values: tuple[float, ...]
    """The distinct rewards of the step (up to a few)."""

    @property
    def flat(self) -> bool:
        return self.groups > 0 and self.flat_groups == self.groups


def step_signal(trajs: list, rewards: list[float]) -> StepSignal:
    """The :class:`StepSignal` of one step's sampled ``trajs`` (grouped by ``meta["group_id"]``) and ``rewards``."""
    groups: dict = defaultdict(set)
    for t, r in zip(trajs, rewards):
        groups[t.meta.get("group_id")].add(round(float(r), 6))
    n = max(1, len(trajs))
    valid = [t.meta.get("reward_info", {}).get("valid_format") for t in trajs]
    valid = [v for v in valid if v is not None]
    return StepSignal(
        flat_groups=sum(1 for v in groups.values() if len(v) == 1), groups=len(groups),
        answered=sum(1 for t in trajs if t.answer is not None) / n,
        valid_format=sum(map(bool, valid)) / len(valid) if valid else None,
        reward_values=tuple(sorted({round(float(r), 3) for r in rewards}))[:4])


@dataclass
class SignalMonitor:
    """Counts consecutive steps without a learning signal; :meth:`update` returns the warning once.

    A step has no signal when every group's samples earned the same reward, or when no trajectory answered.

    Args:
        algorithm: the algorithm's name (the advice differs for filtering algorithms).
        dynamic_filter: whether the algorithm drops groups with identical rewards (DSPO/DAPO).
        reward: the reward's name (a format-aware reward is not advised again).
        patience: consecutive steps without signal before the warning.
    """

    algorithm: str
    dynamic_filter: bool
    reward: str = ""
    patience: int = PATIENCE
    streak: int = 0
    steps_without_signal: int = 0
    steps: int = 0
    warning: str | None = None
    last: StepSignal | None = field(default=None, repr=False)

    def update(self, step: int, trajs: list, rewards: list[float]) -> str | None:
        """Account for one step; the warning text the first time the streak reaches ``patience``, else None."""
        sig = step_signal(trajs, rewards)
        self.steps += 1
        self.last = sig
        if not trajs or not (sig.flat or sig.answered == 0.0):
            self.streak = 0
            return None
        self.streak += 1
        self.steps_without_signal += 1
        if self.streak < self.patience or self.warning is not None:
            return None
        self.warning = self.explain(step, sig)
        return self.warning

    def explain(self, step: int, sig: StepSignal) -> str:
        """The warning: what was seen over the streak, the likely cause, what to try."""
        first = step - self.streak + 1
        rewards = ", ".join(f"{r:.3f}" for r in sig.reward_values)
        seen = (f"no learning signal in steps {first}-{step}: " + (
            f"every group's samples earned the same reward ({rewards})" if sig.flat
            else "no trajectory gave an accepted answer"))
        if sig.flat:
            seen += (", so DSPO/DAPO's filter dropped every group and no update happened" if self.dynamic_filter
                     else ", so every group-relative advantage is 0 and the updates change nothing")
        fmt = "" if sig.valid_format is None else f", {100 * sig.valid_format:.0f}% well-formed"
        if sig.answered == 0.0 or (sig.flat and max(sig.reward_values, default=0.0) <= 0.0):
            cause = (f"the policy does not produce rewarded answers yet (last step: {100 * sig.answered:.0f}% of "
                     f"trajectories answered{fmt}); a randomly initialised or small model rarely follows the "
                     "<search>/<answer> protocol by chance")
            tries = ["a warm start on demonstrations (sft.steps > 0)",
                     "a pretrained, instruction-tuned model (model.path)",
                     "a template the model follows (env.template)"]
            if "format" not in self.reward:
                tries.insert(2, "a reward with credit for the format (env.reward=format_f1)")
        else:
            cause = "every sample of a question earns the same reward: the questions are too easy or too hard, or " \
                    "the reward is too coarse to tell samples apart"
            tries = ["a finer reward (F1 instead of EM: env.reward=format_f1)", "more samples per question "
                     "(rollout.group_size)", "a higher sampling temperature (rollout.temperature)"]
        if self.dynamic_filter:
            tries.append(f"algorithm.name=grpo (no filter: {self.algorithm} drops groups with identical rewards)")
        return f"{seen}.\n  likely cause: {cause}.\n  try: " + "; ".join(tries) + "."

    def summary(self) -> dict:
        """For ``summary.json``: steps without signal out of all, and the warning (None when there was none)."""
        return {"steps_without_signal": self.steps_without_signal, "steps": self.steps, "warning": self.warning}
