"""Off-policy correction between the behaviour policy (the rollout engine) and the proximal policy (the trainer).

Two distributions are in play whenever rollouts are stale (asynchronous/partial rollouts) or the engine's numerics
differ from the trainer's (vLLM vs. the training forward pass):

* ``behaviour_log_probs`` ``[B, T]``: log-probs of the sampled tokens under the policy that *sampled* them, as
  reported by the engine (possibly several policy versions inside one trajectory, see
  :mod:`openrlhf_search.rollout.async_schedule`);
* ``old_log_probs`` ``[B, T]``: the proximal ("old") policy's log-probs recomputed by the trainer, the anchor of the
  PPO/GRPO ratio ``r_t = pi_theta / pi_old``.

The PPO surrogate assumes ``pi_old`` sampled the data. The behaviour/proximal ratio
``rho_t = pi_old(y_t) / pi_behaviour(y_t)`` corrects for the difference; this is the decoupled-PPO objective
(Hilton et al. 2022, "Batch size-invariance for policy optimization", arXiv 2110.00641, used by AReaL, Fu et al.
2025, arXiv 2505.24298, for stale asynchronous rollouts): ``loss = rho_t * max(-A r_t, -A clip(r_t))``, with
``rho`` detached. Two ways to keep ``rho`` from exploding:

* **TIS**, truncated importance sampling: ``w = min(rho, C)`` (Ionides 2008; applied to the vLLM/FSDP mismatch by
  Yao, Liu et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training", the
  fengyao.notion.site blog, whose recipe is token-level ``min(rho_t, C)`` with ``C = 2``).
  Sequence level uses the length-normalised sequence ratio of GSPO (Zheng et al. 2025, arXiv 2507.18071, eq. 7):
  ``rho_i = exp(mean_{t in model tokens} log rho_t)``, ``w_i = min(rho_i, C)`` broadcast over the sequence.
* **MIS**, masked importance sampling: tokens (or whole sequences) whose ``rho`` leaves ``[low, high]`` are removed
  from the loss entirely (IcePop, the Ling/Ring team's "Small leak can sink a great ship" report, 2025, masks
  tokens with ratio outside ``[0.5, 5]``; the same two-sided mask is verl's ``rollout_rs`` rejection sampling).
  Without a ``normalizer``, masking changes the denominator of ``token-mean``: the masked tokens are no longer
  counted. With the step normaliser every backend passes (``losses.step_normalizers``, from the *uncorrected*
  mask, see docs/contracts.md) the masked tokens stay in the denominator with zero gradient, so the normaliser does
  not depend on the micro-batch split; the local trainer and the OpenRLHF adapter both do this.

Every function here is pure (no state, no in-place edits), never reads masked positions (``torch.where``, so NaN
log-probs on padding/retrieved tokens cannot leak) and returns detached weights. :func:`with_offpolicy_correction`
turns either correction into a modifier of any loss of :func:`.losses.get_policy_loss` (presets ``grpo+tis``,
``dspo+mis``, ``sapo+tis``...): it multiplies the per-token advantages by ``w`` (TIS) or shrinks the action mask
(MIS) and calls the wrapped loss unchanged. Multiplying ``A`` by ``w >= 0`` is exactly multiplying the clipped
surrogate by ``w`` (``max(-wA r, -wA clip(r)) = w max(-A r, -A clip(r))``), dual-clip included, and it keeps the
sign of ``A``, so SAPO's positive-advantage term sees the same sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

OFFPOLICY_MODES = ("tis", "mis")
LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class OffPolicyConfig:
    """Configuration of the behaviour/proximal correction (one of TIS or MIS)."""

    mode: str = "tis"
    """``"tis"`` (truncate the weight at ``tis_cap``) or ``"mis"`` (mask tokens/sequences outside the range)."""
    level: str | None = None
    """``"token"`` or ``"sequence"``; None follows the wrapped loss (sequence for GSPO/DSPO, token otherwise)."""
    tis_cap: float = 2.0
    """TIS truncation ``C`` (Yao et al. 2025 use 2)."""
    mis_low: float = 0.5
    """MIS lower bound of ``rho`` (IcePop: 0.5)."""
    mis_high: float = 5.0
    """MIS upper bound of ``rho`` (IcePop: 5)."""
    log_ratio_clamp: float = 20.0
    """``|log rho|`` is clamped before ``exp`` so the weight never overflows."""

    def validate(self) -> OffPolicyConfig:
        """Raise ``ValueError`` naming the field when inconsistent; return ``self``."""
        problems = []
        if self.mode not in OFFPOLICY_MODES:
            problems.append(f"mode={self.mode!r} (valid: {', '.join(OFFPOLICY_MODES)})")
        if self.level is not None and self.level not in LEVELS:
            problems.append(f"level={self.level!r} (valid: token, sequence or None)")
        if not self.tis_cap > 0:
            problems.append(f"tis_cap={self.tis_cap} (expected > 0)")
        if not 0 <= self.mis_low < self.mis_high:
            problems.append(f"mis_low={self.mis_low}, mis_high={self.mis_high} (expected 0 <= low < high)")
        if not self.log_ratio_clamp > 0:
            problems.append(f"log_ratio_clamp={self.log_ratio_clamp} (expected > 0)")
        if problems:
            raise ValueError("off-policy correction: invalid config: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------- ratios
def behaviour_log_ratio(
    old_log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    level: str = "token",
    log_ratio_clamp: float = 20.0,
) -> torch.Tensor:
    """``log rho = log pi_old - log pi_behaviour`` ``[B, T]``, 0 on masked positions.

    ``level="sequence"``: every model token of row ``i`` carries ``mean_t log rho_it`` (GSPO's length-normalised
    sequence log-ratio; rows without model tokens get 0). Detached.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r}: expected 'token' or 'sequence'")
    if old_log_probs.shape != behaviour_log_probs.shape or old_log_probs.shape != action_mask.shape:
        raise ValueError(
            f"old_log_probs {tuple(old_log_probs.shape)}, behaviour_log_probs {tuple(behaviour_log_probs.shape)} "
            f"and action_mask {tuple(action_mask.shape)} must have the same [B, T] shape"
        )
    mask = action_mask.bool()
    old = old_log_probs.detach().float()
    beh = behaviour_log_probs.detach().float()
    zeros = torch.zeros_like(old)
    log_rho = torch.where(mask, old - beh, zeros).clamp(-log_ratio_clamp, log_ratio_clamp)
    if level == "sequence":
        n_tok = mask.sum(-1, keepdim=True)
        seq = log_rho.sum(-1, keepdim=True) / n_tok.clamp(min=1)
        log_rho = torch.where(mask, seq.expand_as(log_rho), zeros)
    return log_rho


def truncated_is_weights(
    old_log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    cap: float = 2.0,
    level: str = "token",
    log_ratio_clamp: float = 20.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TIS weights ``w = min(rho, cap)`` ``[B, T]`` (0 on masked positions) and diagnostics.

    Diagnostics: see :func:`offpolicy_diagnostics`, plus ``offpolicy/truncated_share`` (share of model tokens, or
    of sequences at sequence level, whose weight was cut at ``cap``) and ``offpolicy/weight_mean``.
    """
    if not cap > 0:
        raise ValueError(f"TIS cap={cap}: expected > 0")
    mask = action_mask.bool()
    log_rho = behaviour_log_ratio(old_log_probs, behaviour_log_probs, mask, level, log_ratio_clamp)
    rho = torch.exp(log_rho)
    w = torch.where(mask, rho.clamp(max=cap), torch.zeros_like(rho))
    truncated = mask & (rho > cap)
    metrics = offpolicy_diagnostics(log_rho, mask, level=level)
    metrics["offpolicy/truncated_share"] = _share(truncated, mask, level)
    metrics["offpolicy/weight_mean"] = _masked_mean(w, mask)
    return w, metrics


def masked_is(
    old_log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    low: float = 0.5,
    high: float = 5.0,
    level: str = "token",
    log_ratio_clamp: float = 20.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MIS: the action mask ``[B, T]`` (bool) with tokens (or sequences) whose ``rho`` leaves ``[low, high]`` removed.

    Diagnostics: see :func:`offpolicy_diagnostics`, plus ``offpolicy/masked_share`` (share of model tokens, or of
    sequences with model tokens at sequence level, that were dropped).
    """
    if not 0 <= low < high:
        raise ValueError(f"MIS range [{low}, {high}]: expected 0 <= low < high")
    mask = action_mask.bool()
    log_rho = behaviour_log_ratio(old_log_probs, behaviour_log_probs, mask, level, log_ratio_clamp)
    rho = torch.exp(log_rho)
    keep = (rho >= low) & (rho <= high)
    new_mask = mask & keep
    metrics = offpolicy_diagnostics(log_rho, mask, level=level)
    metrics["offpolicy/masked_share"] = _share(mask & ~keep, mask, level)
    return new_mask, metrics


# --------------------------------------------------------------------------------------------- diagnostics
def staleness(
    token_versions: torch.Tensor, action_mask: torch.Tensor, current_version: int
) -> torch.Tensor:
    """Per-sample staleness ``[B]`` (long): ``current_version - min(version of its model tokens)``; 0 without tokens.

    ``token_versions`` ``[B, T]`` is the policy version that sampled each token (partial rollouts mix versions).
    """
    mask = action_mask.bool()
    big = torch.full_like(token_versions, torch.iinfo(torch.long).max, dtype=torch.long)
    oldest = torch.where(mask, token_versions.long(), big).amin(-1)
    has = mask.any(-1)
    return torch.where(has, current_version - oldest, torch.zeros_like(oldest))


def offpolicy_diagnostics(
    log_rho: torch.Tensor,
    action_mask: torch.Tensor,
    level: str = "token",
    token_versions: torch.Tensor | None = None,
    current_version: int | None = None,
    quantiles: Sequence[float] = (0.01, 0.1, 0.5, 0.9, 0.99),
) -> dict[str, float]:
    """Quantiles of ``rho = exp(log_rho)`` over model tokens (or over sequences at sequence level), and staleness.

    Keys: ``offpolicy/rho_q{q}`` per quantile, ``offpolicy/rho_mean``, ``offpolicy/abs_log_rho_mean``; with
    ``token_versions`` and ``current_version``: ``offpolicy/staleness_mean``, ``offpolicy/staleness_max`` and
    ``offpolicy/staleness_{k}_share`` for every observed ``k``. All Python floats; NaN quantiles when empty.
    """
    mask = action_mask.bool()
    if level == "sequence":
        rows = mask.any(-1)
        first = mask.float().argmax(-1)
        values = log_rho.gather(1, first[:, None])[:, 0][rows]
    else:
        values = log_rho[mask]
    rho = torch.exp(values.float())
    out: dict[str, float] = {}
    for q in quantiles:
        out[f"offpolicy/rho_q{q:g}"] = float(torch.quantile(rho, q)) if rho.numel() else float("nan")
    out["offpolicy/rho_mean"] = float(rho.mean()) if rho.numel() else float("nan")
    out["offpolicy/abs_log_rho_mean"] = float(values.abs().mean()) if values.numel() else float("nan")
    if token_versions is not None and current_version is not None:
        st = staleness(token_versions, mask, current_version)[mask.any(-1)]
        if st.numel():
            out["offpolicy/staleness_mean"] = float(st.float().mean())
            out["offpolicy/staleness_max"] = float(st.max())
            for k in sorted(set(st.tolist())):
                out[f"offpolicy/staleness_{int(k)}_share"] = float((st == k).float().mean())
    return out


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    n = mask.sum()
    return float(torch.where(mask, values, torch.zeros_like(values)).sum() / n) if n > 0 else float("nan")


def _share(flag: torch.Tensor, mask: torch.Tensor, level: str) -> float:
    if level == "sequence":
        rows = mask.any(-1)
        n = rows.sum()
        return float((flag.any(-1) & rows).sum() / n) if n > 0 else 0.0
    n = mask.sum()
    return float((flag & mask).sum() / n) if n > 0 else 0.0


# --------------------------------------------------------------------------------------------- loss modifier
class OffPolicyCorrectedLoss:
    """A :class:`~.losses.PolicyLoss` with TIS or MIS applied in front (see :func:`with_offpolicy_correction`).

    Its normalisers are the wrapped loss's, counted on the *uncorrected* mask and advantages: tokens MIS drops stay
    in the step's denominator with zero gradient, so the normaliser does not depend on the micro-batch split.
    """

    needs_behaviour_log_probs = True

    def __init__(self, loss: Any, config: OffPolicyConfig) -> None:
        self.loss = loss
        self.offpolicy = config
        self.config = getattr(loss, "config", None)
        self.name = f"{getattr(loss, 'name', getattr(loss, '__name__', 'loss'))}+{config.mode}"
        self.__name__ = f"{getattr(loss, '__name__', 'loss')}+{config.mode}"
        self.level = config.level or ("sequence" if getattr(self.config, "ratio_level", "token") == "sequence"
                                      else "token")  # fmt: skip

    @property
    def needs_ref_log_probs(self) -> bool:
        return bool(getattr(self.loss, "needs_ref_log_probs", False))

    @property
    def needs_entropy(self) -> bool:
        return bool(getattr(self.loss, "needs_entropy", False))

    def normalizers(self, action_mask: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        inner = getattr(self.loss, "normalizers", None)
        return inner(action_mask, advantages) if inner is not None else {}

    def __call__(self, log_probs, old_log_probs, advantages, action_mask, *, behaviour_log_probs=None,
                 token_versions=None, current_version=None, **extra):
        config, level = self.offpolicy, self.level
        if behaviour_log_probs is None:
            raise ValueError(
                f"off-policy correction {config.mode!r}: the loss needs behaviour_log_probs=[B, T] (the rollout "
                "engine's log-probs of the sampled tokens); the trainer did not pass them"
            )
        if config.mode == "tis":
            w, metrics = truncated_is_weights(old_log_probs, behaviour_log_probs, action_mask, config.tis_cap,
                                              level, config.log_ratio_clamp)
            adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(w)
            advantages, mask = adv.detach() * w.to(adv.dtype), action_mask
        else:
            mask, metrics = masked_is(old_log_probs, behaviour_log_probs, action_mask, config.mis_low,
                                      config.mis_high, level, config.log_ratio_clamp)
            mask = mask.to(action_mask.dtype)
        loss, inner = self.loss(log_probs, old_log_probs, advantages, mask, **extra)
        if token_versions is not None and current_version is not None:
            log_rho = behaviour_log_ratio(old_log_probs, behaviour_log_probs, action_mask, level,
                                          config.log_ratio_clamp)
            metrics.update(offpolicy_diagnostics(log_rho, action_mask, level, token_versions, current_version))
        return loss, {**inner, **metrics}


def with_offpolicy_correction(loss_fn: Callable, mode: str, **cfg) -> OffPolicyCorrectedLoss:
    """Wrap a policy loss (``fn(log_probs, old_log_probs, advantages, action_mask, **extra)``) with TIS or MIS.

    The returned loss takes the extra keyword ``behaviour_log_probs`` ``[B, T]`` (required) and optionally
    ``token_versions`` ``[B, T]`` + ``current_version`` (int) for the staleness diagnostics; every other keyword is
    passed through to ``loss_fn`` (``ref_log_probs``, ``entropy``, ``normalizer``...). ``cfg``: fields of
    :class:`OffPolicyConfig` other than ``mode``. Metrics: the wrapped loss's plus the ``offpolicy/*`` ones.
    """
    return OffPolicyCorrectedLoss(loss_fn, OffPolicyConfig(mode=mode, **cfg).validate())
