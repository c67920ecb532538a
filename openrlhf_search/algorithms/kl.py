"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020), masked.

We estimate ``KL(pi || ref)`` from tokens sampled from ``pi`` (the policy that produced them). With
``log r = log ref(y) - log pi(y)``:

* ``k1 = -log r``                  unbiased, high variance, can be negative per token;
* ``k2 = (log r)^2 / 2``           biased, low variance, always >= 0; its gradient is that of the reverse KL;
* ``k3 = (r - 1) - log r``         unbiased, low variance, always >= 0 (the GRPO paper's choice, eq. 4).

``log r`` is clamped to ``[-clamp, clamp]`` (default 20) before exponentiation so that k3 can never overflow; the
clamp only acts on tokens whose probabilities differ by more than e^20, where the estimate is meaningless anyway.
Masked tokens are *selected away* with ``torch.where`` (never multiplied), so a NaN/inf log-prob on a masked
(padding, retrieved-passage) token yields exactly 0 and a zero gradient.

To estimate KL(old || new) from rollouts sampled by ``old`` (the diagnostic "approx KL to old"), call
``kl_penalty(old_log_probs, log_probs, ...)``: the first argument is always the sampling policy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .registry import Registry

KL_ESTIMATORS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(log_r: torch.Tensor) -> torch.Tensor:
    return -log_r


@KL_ESTIMATORS.register("k2")
def _k2(log_r: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_r * log_r


@KL_ESTIMATORS.register("k3")
def _k3(log_r: torch.Tensor) -> torch.Tensor:
    return torch.expm1(log_r) - log_r


def kl_penalty(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k3",
    clamp: float = 20.0,
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || ref)`` on tokens sampled from ``pi``.

    Args:
        log_probs: ``[B, T]`` log pi(y_t) of the sampled tokens (differentiable).
        ref_log_probs: ``[B, T]`` log ref(y_t) (treated as a constant; detach it yourself if it has a graph).
        mask: optional ``[B, T]`` bool/0-1 mask; masked positions return exactly 0.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        clamp: bound on ``|log r|`` before the estimator.
    Returns:
        ``[B, T]`` per-token KL estimates.
    """
    fn = KL_ESTIMATORS.get(estimator)
    log_r = ref_log_probs - log_probs
    if mask is not None:
        log_r = torch.where(mask.bool(), log_r, torch.zeros_like(log_r))
    log_r = log_r.clamp(-clamp, clamp)
    out = fn(log_r)
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros_like(out))
    return out


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty), selecting with ``torch.where``."""
    mask = mask.bool()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)
