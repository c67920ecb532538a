"""Outcome-reward advantage estimators with group ids (one scalar reward per trajectory).

Every estimator is built by ``get_advantage_estimator(name, **cfg)`` and has the uniform signature
``fn(rewards[B], group_ids[B]) -> advantages[B]`` (float tensors, same device). ``group_ids`` are arbitrary
integers (not necessarily contiguous or sorted): rows sharing an id are the G samples of one prompt.
The loss broadcasts the per-trajectory advantage onto that trajectory's model tokens.

Shared conventions (all estimators):
* a group of size 1 has no baseline to compare with: its advantage is 0 (never NaN);
* a group whose rewards are all equal carries no signal: its advantages are exactly 0;
* rewards may be any real numbers (EM in {0, 1}, F1 in [0, 1], format-shaped rewards, ...).

Estimators:
* ``grpo``  -- Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300, sec. 4.1.2, outcome supervision):
  ``A_i = (R_i - mean(R_g)) / (std(R_g) + eps)``. ``std`` is the *unbiased* (Bessel-corrected, ``n-1``)
  standard deviation by default, as in verl's and OpenRLHF's ``group_norm`` (``torch.std``), so that numbers
  match those trainers; ``unbiased=False`` gives the population std (TRL). ``eps`` defaults to 1e-6.
* ``dr_grpo`` -- Liu et al. 2025 (Dr. GRPO, arXiv 2503.20783, eq. 3): ``A_i = R_i - mean(R_g)``; the std
  division is dropped because it re-weights prompts by their difficulty.
* ``rloo`` -- Ahmadian et al. 2024 (arXiv 2402.14740): leave-one-out baseline
  ``A_i = R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean(R_g))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .registry import Registry

AdvantageFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

ADVANTAGE_ESTIMATORS: Registry[Callable[..., AdvantageFn]] = Registry("advantage estimator")


def register_advantage_estimator(name: str):
    """Register a factory ``factory(**cfg) -> fn(rewards[B], group_ids[B]) -> advantages[B]`` under ``name``."""
    return ADVANTAGE_ESTIMATORS.register(name)


def get_advantage_estimator(name: str, **cfg) -> AdvantageFn:
    """Build the advantage estimator ``name`` with config ``cfg``.

    Unknown names raise ``KeyError`` listing the valid ones; unknown config keys raise ``TypeError``.
    """
    factory = ADVANTAGE_ESTIMATORS.get(name)
    try:
        return factory(**cfg)
    except TypeError as exc:
        raise TypeError(f"advantage estimator {name!r}: bad config {cfg}: {exc}") from None


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row group statistics, vectorized (no Python loop over groups).

    Args:
        rewards: ``[B]`` float rewards.
        group_ids: ``[B]`` integer group ids (any values).
    Returns:
        ``(count[B], mean[B], sq_dev_sum[B])`` of the row's group, where ``sq_dev_sum = sum_j (R_j - mean)^2``,
        in float64 (the estimators cast their result back to the rewards' dtype).
    """
    rewards, group_ids = _check(rewards, group_ids)
    # float64 accumulation: in float32 the mean of G equal F1 rewards (e.g. 0.7) is off by an ulp, and GRPO's
    # division by (std + eps) would blow that rounding noise up into advantages of order 0.1.
    r64 = rewards.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max().item()) + 1 if inv.numel() else 0
    zeros = torch.zeros(n_groups, dtype=r64.dtype, device=r64.device)
    count = zeros.clone().index_add_(0, inv, torch.ones_like(r64))
    total = zeros.clone().index_add_(0, inv, r64)
    mean = total / count
    # a group whose rewards are all exactly equal has zero deviation by definition (no rounding residue)
    hi = zeros.clone().scatter_reduce(0, inv, r64, "amax", include_self=False)
    lo = zeros.clone().scatter_reduce(0, inv, r64, "amin", include_self=False)
    mean = torch.where(hi == lo, hi, mean)
    dev = r64 - mean[inv]
    sq = zeros.clone().index_add_(0, inv, dev * dev)
    return count[inv], mean[inv], sq[inv]


def _check(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be 1-D of the same length, got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()[:5]
        raise ValueError(f"rewards contain NaN/inf at rows {bad}")
    return rewards.detach(), group_ids


@register_advantage_estimator("grpo")
def _grpo(eps: float = 1e-6, unbiased: bool = True) -> AdvantageFn:
    """GRPO: group mean-centred, std-normalised. ``eps``: added to the std; ``unbiased``: Bessel-corrected std."""

    def fn(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        count, mean, sq = group_stats(rewards, group_ids)
        rewards_f, _ = _check(rewards, group_ids)
        denom = (count - 1.0) if unbiased else count
        std = torch.sqrt(sq / denom.clamp(min=1.0))
        adv = (rewards_f.double() - mean) / (std + eps)
        return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards_f.dtype)

    return fn


@register_advantage_estimator("dr_grpo")
def _dr_grpo() -> AdvantageFn:
    """Dr. GRPO: group mean-centred only."""

    def fn(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        count, mean, _ = group_stats(rewards, group_ids)
        rewards_f, _ = _check(rewards, group_ids)
        adv = rewards_f.double() - mean
        return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards_f.dtype)

    return fn


@register_advantage_estimator("rloo")
def _rloo() -> AdvantageFn:
    """RLOO: reward minus the mean of the *other* rewards of the group."""

    def fn(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        count, mean, _ = group_stats(rewards, group_ids)
        rewards_f, _ = _check(rewards, group_ids)
        adv = count / (count - 1.0).clamp(min=1.0) * (rewards_f.double() - mean)
        return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards_f.dtype)

    return fn
