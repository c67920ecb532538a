"""DSPO / DAPO group filtering: keep only groups whose outcomes differ, and refill the batch across rounds.

A group whose G rollouts all got the same reward has zero GRPO advantage for every token: it costs a forward and
backward pass and contributes nothing but a smaller effective batch. DSPO (dynamic-filtering sequence-level
policy optimisation for search agents) and DAPO's "dynamic sampling" (Yu et al. 2025, arXiv 2503.14476, sec. 3.2)
drop such groups and keep sampling new prompts until the batch holds ``target_groups`` informative groups.

* :func:`mixed_outcome_groups` -- the filter (public API): for binary rewards it keeps groups with
  ``0 < sum(R) < G``; in general it keeps groups whose reward spread ``max - min`` exceeds ``tol`` (so F1 rewards
  work). Groups of size 1 are never mixed.
* :class:`GroupBatcher` -- accumulates kept groups over sampling rounds. It never loops by itself (the caller
  samples), it refuses to run past ``max_rounds``, and when the cap is hit it either raises
  :class:`BatchNotFilledError` with the per-round keep ratios (``on_cap="error"``, default) or returns the partial
  batch with a loud ``warnings.warn`` and ``partial = True`` in its report / metrics (``on_cap="partial"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def mixed_outcome_groups(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Rows whose group has a non-degenerate reward spread.

    Args:
        rewards: ``[B]`` rewards (binary, F1, ...).
        group_ids: ``[B]`` integer group ids (any values, any order).
        tol: a group is mixed when ``max(R_g) - min(R_g) > tol``.
    Returns:
        ``bool[B]``: True for every row of a mixed group.
    """
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device)
    rewards = rewards.detach().double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = int(inv.max().item()) + 1
    init = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    hi = init.scatter_reduce(0, inv, rewards, "amax", include_self=False)
    lo = init.scatter_reduce(0, inv, rewards, "amin", include_self=False)
    return ((hi - lo) > tol)[inv]


class BatchNotFilledError(RuntimeError):
    """Raised by :class:`GroupBatcher` when ``max_rounds`` is reached before ``target_groups`` were kept."""

    def __init__(self, report: BatchReport) -> None:
        self.report = report
        super().__init__(report.summary())


@dataclass
class BatchReport:
    """What happened while filling one batch."""

    target_groups: int
    """Groups the batch should hold."""
    kept_groups: int = 0
    """Groups actually in the batch (== target unless partial)."""
    rounds: int = 0
    """Sampling rounds consumed."""
    offered_per_round: list[int] = field(default_factory=list)
    """Groups offered to the filter in each round."""
    kept_per_round: list[int] = field(default_factory=list)
    """Mixed-outcome groups found in each round."""
    dropped_surplus: int = 0
    """Kept groups discarded because the batch was already full."""
    partial: bool = False
    """True when the cap was hit and the batch is smaller than ``target_groups``."""

    @property
    def keep_ratio_per_round(self) -> list[float]:
        """Share of offered groups kept, per round."""
        return [k / o if o else 0.0 for k, o in zip(self.kept_per_round, self.offered_per_round)]

    @property
    def keep_ratio(self) -> float:
        """Share of all offered groups that were mixed."""
        offered = sum(self.offered_per_round)
        return sum(self.kept_per_round) / offered if offered else 0.0

    def summary(self) -> str:
        ratios = ", ".join(f"{r:.2f}" for r in self.keep_ratio_per_round)
        state = "PARTIAL" if self.partial else ("full" if self.kept_groups >= self.target_groups else "filling")
        return (
            f"group batch {state}: {self.kept_groups}/{self.target_groups} mixed-outcome groups after {self.rounds} "
            f"round(s); keep ratio per round [{ratios}] (overall {self.keep_ratio:.2f})"
        )

    def as_metrics(self, prefix: str = "filter/") -> dict[str, float]:
        """Flat float metrics for a logger."""
        return {
            f"{prefix}keep_ratio": self.keep_ratio,
            f"{prefix}rounds": float(self.rounds),
            f"{prefix}kept_groups": float(self.kept_groups),
            f"{prefix}target_groups": float(self.target_groups),
            f"{prefix}partial": float(self.partial),
            f"{prefix}dropped_surplus": float(self.dropped_surplus),
        }


@dataclass
class GroupBatch:
    """A filled batch of whole groups, rows in group order."""

    rewards: torch.Tensor
    """``[N]`` rewards of the kept rows."""
    group_ids: torch.Tensor
    """``[N]`` new contiguous group ids ``0..kept_groups-1`` (ids of different rounds may collide)."""
    items: list[Any]
    """Per-row payloads passed to :meth:`GroupBatcher.add` (e.g. trajectories), aligned with ``rewards``."""
    sources: list[tuple[int, int]]
    """Per kept group: ``(round index, original group id)``."""
    report: BatchReport
    """How the batch was filled."""


class GroupBatcher:
    """Accumulate mixed-outcome groups over sampling rounds until ``target_groups`` are kept.

    Usage::

        batcher = GroupBatcher(target_groups=32, max_rounds=4)
        while not batcher.done:
            rewards, group_ids, trajs = sample_round()       # the caller samples
            batcher.add(rewards, group_ids, trajs)
        batch = batcher.result()                            # GroupBatch; batch.report.as_metrics() to log

    Args:
        target_groups: groups per batch (> 0).
        max_rounds: at most this many rounds are accepted (DAPO caps retries; ~3x oversampling is typical).
        on_cap: ``"error"`` raises :class:`BatchNotFilledError` when the cap is hit unfilled; ``"partial"``
            returns the partial batch with a warning and ``report.partial = True``.
        tol: reward-spread tolerance of :func:`mixed_outcome_groups`.
    """

    def __init__(self, target_groups: int, max_rounds: int = 3, on_cap: str = "error", tol: float = 1e-6) -> None:
        if target_groups < 1:
            raise ValueError(f"GroupBatcher: target_groups must be >= 1, got {target_groups}")
        if max_rounds < 1:
            raise ValueError(f"GroupBatcher: max_rounds must be >= 1, got {max_rounds}")
        if on_cap not in ("error", "partial"):
            raise ValueError(f"GroupBatcher: on_cap must be 'error' or 'partial', got {on_cap!r}")
        self.target_groups = target_groups
        self.max_rounds = max_rounds
        self.on_cap = on_cap
        self.tol = tol
        self.report = BatchReport(target_groups=target_groups)
        self._groups: list[tuple[torch.Tensor, list[Any], tuple[int, int]]] = []

    @property
    def full(self) -> bool:
        """True once ``target_groups`` groups are kept."""
        return len(self._groups) >= self.target_groups

    @property
    def done(self) -> bool:
        """True when no more rounds should be sampled (full, or the round cap is reached)."""
        return self.full or self.report.rounds >= self.max_rounds

    def add(self, rewards: torch.Tensor, group_ids: torch.Tensor, items: Sequence[Any] | None = None) -> BatchReport:
        """Offer one sampling round; keep its mixed-outcome groups (whole groups, in order of first appearance).

        Args:
            rewards: ``[B]`` rewards of the round.
            group_ids: ``[B]`` group ids of the round.
            items: optional per-row payloads (len B) carried into the batch.
        Returns:
            The running :class:`BatchReport`.
        Raises:
            RuntimeError: if called when :attr:`done` is already True.
            BatchNotFilledError: when this round reaches ``max_rounds`` unfilled and ``on_cap="error"``.
        """
        if self.done:
            raise RuntimeError(f"GroupBatcher.add called after the batch is done ({self.report.summary()})")
        rewards = torch.as_tensor(rewards)
        group_ids = torch.as_tensor(group_ids)
        if items is not None and len(items) != rewards.shape[0]:
            raise ValueError(f"GroupBatcher.add: {len(items)} items for {rewards.shape[0]} rewards")
        keep = mixed_outcome_groups(rewards, group_ids, self.tol)
        round_idx = self.report.rounds
        order: list[int] = []
        rows: dict[int, list[int]] = {}
        for row, gid in enumerate(group_ids.tolist()):
            if gid not in rows:
                rows[gid] = []
                order.append(gid)
            rows[gid].append(row)
        kept = 0
        for gid in order:
            idx = rows[gid]
            if not bool(keep[idx[0]]):
                continue
            kept += 1
            if self.full:
                self.report.dropped_surplus += 1
                continue
            payload = [items[i] for i in idx] if items is not None else [None] * len(idx)
            self._groups.append((rewards[idx].detach().clone(), payload, (round_idx, gid)))
        self.report.rounds += 1
        self.report.offered_per_round.append(len(order))
        self.report.kept_per_round.append(kept)
        self.report.kept_groups = len(self._groups)
        if self.report.rounds >= self.max_rounds and not self.full:
            self.report.partial = True
            if self.on_cap == "error":
                raise BatchNotFilledError(self.report)
            warnings.warn(
                f"{self.report.summary()}: max_rounds={self.max_rounds} reached, training on a PARTIAL batch "
                "(raise max_rounds or the number of prompts per round; most groups are all-correct or all-wrong)",
                RuntimeWarning,
                stacklevel=2,
            )
        return self.report

    def result(self) -> GroupBatch:
        """The filled (or, with ``on_cap="partial"``, partial) batch; raises if sampling is not done yet."""
        if not self.done:
            raise RuntimeError(f"GroupBatcher.result called before the batch is done ({self.report.summary()})")
        if not self._groups:
            raise BatchNotFilledError(self.report)
        rewards = torch.cat([g[0] for g in self._groups])
        group_ids = torch.cat([torch.full((len(g[0]),), k, dtype=torch.long) for k, g in enumerate(self._groups)])
        items = [it for g in self._groups for it in g[1]]
        return GroupBatch(rewards, group_ids, items, [g[2] for g in self._groups], self.report)
