"""Clipped policy-gradient losses for outcome-reward RL on search trajectories.

Every loss is built by ``get_policy_loss(name, **cfg)`` and has the uniform signature::

    loss, metrics = fn(log_probs, old_log_probs, advantages, action_mask, ref_log_probs=None, entropy=None,
                       normalizer=None, sapo_normalizer=None)

What a backend may ask a loss is the :class:`PolicyLoss` protocol: its typed ``config``, the per-micro-batch counts
of the normalisers it needs for an optimizer step (``normalizers(action_mask, advantages)``, summed and
all-reduced by :func:`step_normalizers`), what it needs at call time (``needs_ref_log_probs``, ``needs_entropy``,
``needs_behaviour_log_probs``) and the call itself. Backends never read a loss's hyperparameters, so a loss with
hyperparameters of its own (a plugin: a config dataclass, usually extending :class:`PolicyLossConfig`, and a
:class:`ClippedPolicyLoss` subclass or any class meeting the protocol) runs on every backend unchanged.

``log_probs`` ``[B, T]`` are the current policy's log-probs of the sampled tokens (differentiable);
``old_log_probs`` ``[B, T]`` those of the rollout policy; ``advantages`` ``[B]`` (one per trajectory, broadcast)
or ``[B, T]`` (per token, e.g. after CalibAdv); ``action_mask`` ``[B, T]`` is True/1 on tokens the model
generated and False/0 on prompt padding, response padding and retrieved ``<information>`` passages. ``metrics``
is a dict of Python floats (see :mod:`.diagnostics`).

Masked tokens get *exactly* zero gradient even if their log-probs are NaN/inf: they are selected away with
``torch.where`` before any arithmetic (a multiplication by the mask would turn ``0 * inf`` into NaN).

Names and their defaults (any field of :class:`PolicyLossConfig` can be overridden by keyword):

* ``ppo`` / ``grpo`` -- token ratio ``r_t = pi_theta(y_t) / pi_old(y_t)``, PPO clip 0.2/0.2
  (Schulman et al. 2017, eq. 7; the GRPO objective of Shao et al. 2024, eq. 3, is the same clipped surrogate),
  ``token-mean`` aggregation, optional dual-clip (Ye et al. 2020: for ``A < 0`` the loss is capped at ``-c A``).
* ``dapo`` -- clip-higher (Yu et al. 2025, arXiv 2503.14476, eq. 8-10): ``clip_low=0.2``, ``clip_high=0.28``,
  ``token-mean`` aggregation. DAPO's dynamic sampling lives in :mod:`.filtering` and the presets.
* ``gspo`` -- sequence ratio (Zheng et al. 2025, arXiv 2507.18071, eq. 7):
  ``s_i = exp(mean_{t in model tokens} log r_t)``, loss ``-min(s_i A, clip(s_i, 1-3e-4, 1+4e-4) A)``,
  ``seq-mean-token-mean`` aggregation. Implemented in the GSPO-token form (GSPO eq. 13):
  ``s_{i,t} = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)]`` whose value is ``s_i`` and whose gradient, with
  sequence-constant advantages and ``seq-mean-token-mean``, equals the sequence form's
  ``A_i s_i (1/|y_i|) sum_t grad log pi_theta(y_t)`` (DSPO paper eq. 8) -- while still accepting per-token
  advantages (CalibAdv). Retrieved tokens never enter ``|y_i|``: only model tokens count.
* ``dspo`` -- the same loss as ``gspo``; DSPO's other half, keeping only mixed-outcome groups until the batch
  is full, is :func:`.filtering.mixed_outcome_groups` + :class:`.filtering.GroupBatcher` (preset ``dspo``).
* ``sapo`` -- ``ppo`` plus SAPO's conditional KL term (arXiv 2603.10069)::

      kl_term = sum_{i: A_i >= 0} sum_t m_it * 1[r_it <= t] * (log pi_old(y_t) - log pi_theta(y_t))
                / sum_{i: A_i >= 0} sum_t m_it
      loss = pg_loss + w * kl_term

  a k1 estimate of KL(pi_old || pi_theta) on positive-advantage tokens whose probability *drifted down* to at most
  ``t`` times the rollout's; it is differentiable through ``log pi_theta`` (it pulls those tokens back up) and it is
  not clipped. The denominator counts every model token of the non-negative-advantage sequences. With per-token
  advantages (CalibAdv) a sequence is non-negative when none of its model tokens has ``A < 0`` (identical to
  ``A_i >= 0`` for sequence-constant advantages; a failed rollout whose good search turns CalibAdv zeroed stays out).
  ``t`` (``sapo_threshold``) and ``w`` (``sapo_coef``) were not published in what we could read; the defaults
  ``t = 0.5`` and ``w = 0.5`` are OURS, not the paper's. ``t = 0.5`` sits well below the PPO clip range
  (``1 - 0.2``), so the term only fires on tokens whose probability halved since sampling -- genuine drift, not
  ordinary PPO movement. ``w`` was picked by a sweep on the toy task of ``openrlhf-search demo-algorithms``
  (8 off-policy epochs per batch, lr 0.3, 3 seeds; table in docs/algorithms.md): ``w = 0.1`` left the drift
  share unchanged (0.0109 vs 0.0119 for grpo), ``w = 0.5`` halved it (0.0060) and ``w = 1, 2`` lowered it
  further (0.0056, 0.0041), all at the same final reward within seed noise; 0.5 is the smallest weight with a
  clear effect. A toy is not a search agent: the trainer may retune both on real runs.

Aggregation modes (``loss_agg``), over model tokens ``m_it`` of the optimizer step (see the distributed note):

* ``token-mean``: ``sum_it m l / sum_it m`` (DAPO, OpenRLHF's default);
* ``seq-mean-token-mean``: mean over sequences with at least one model token of their token-mean (GRPO paper);
* ``seq-mean-token-sum``: mean over sequences of their token *sum*;
* ``seq-mean-token-sum-norm``: ``sum_it m l / (n_seq * norm)`` with ``norm = loss_agg_norm`` (e.g. the
  generation budget ``max_len``; Dr. GRPO) or ``T`` (the padded length) when unset. Set ``loss_agg_norm`` if the
  loss must not depend on how much padding a batch carries (with ``T``, micro-batches padded to different widths
  use different ``T``).

Optional terms: ``kl_coef * agg(k(log pi, log ref))`` with estimator ``kl_estimator`` (needs ``ref_log_probs``)
and ``- entropy_coef * agg(entropy)`` (needs ``entropy``), aggregated with the same mode and normaliser.

Distributed note (one objective on every backend): each name means ONE objective over the whole optimizer step,
however the step is cut into micro-batches (gradient accumulation) and data-parallel ranks. Every aggregate is
written ``sum / count``; a backend passes ``normalizer=`` = the step's global count (model tokens for
``token-mean``, sequences with >= 1 model token for ``seq-mean-*``), obtained by summing
:func:`loss_normalizer` over its micro-batches and all-reducing (SUM) over the data-parallel group --
:func:`step_normalizers` does both. Each micro-batch's loss is then its share ``local sum / global count``, and the
SUM of the micro-batch losses over the step is the step's objective; a backend must therefore neither divide by
the number of micro-batches nor average gradients over ranks without undoing it (the local trainer sums;
OpenRLHF/DeepSpeed and Megatron multiply by ``grad-accum steps x dp_size`` to cancel their ``1/gas`` and DP
averaging). Sequence modes are exact because a sequence never spans micro-batches (its token-mean is local).
SAPO's KL term is a mean over the model tokens of non-negative-advantage sequences: globally, its denominator is
that count over the whole step (``sapo_normalizer=``, from :func:`sapo_normalizer`, summed and all-reduced the same
way; the loss's ``normalizers`` lists it when ``sapo_coef > 0``), so the term is also micro-batch invariant -- not
the micro-batch mean of the paper's single-batch listing, which would weigh tokens of small micro-batches more.
Without ``normalizer`` each call uses its local counts (a single micro-batch on one rank is then exact).
Verified on CPU: 1, 2 and 4 micro-batches give the same gradient for every name and mode
(tests/algorithms/test_loss_normaliser.py), and so do the local trainer's micro-batches, OpenRLHF's
adapter and Megatron at DP=1 and DP=2 (gloo).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from .diagnostics import policy_diagnostics
from .kl import KL_ESTIMATORS, kl_penalty
from .registry import Registry

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


# --------------------------------------------------------------------------------------------- aggregation
LOSS_AGGREGATIONS: Registry[Callable[..., torch.Tensor]] = Registry("loss aggregation")


def _denominator(local: torch.Tensor, normalizer, like: torch.Tensor) -> torch.Tensor:
    """``normalizer`` (the whole step's count) as a tensor like ``like``, else the local count; never 0."""
    if normalizer is None:
        return local.clamp(min=1).to(like.dtype)
    n = torch.as_tensor(normalizer, dtype=like.dtype, device=like.device)
    return torch.where(n > 0, n, torch.ones_like(n))  # an all-masked step has a zero sum: 0 / 1, not NaN


@LOSS_AGGREGATIONS.register("token-mean")
def _token_mean(values: torch.Tensor, mask: torch.Tensor, norm: float | None = None, normalizer=None) -> torch.Tensor:
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / _denominator(mask.sum(), normalizer, total)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(
    values: torch.Tensor, mask: torch.Tensor, norm: float | None = None, normalizer=None
) -> torch.Tensor:
    n_tok = mask.sum(-1)
    per_seq = torch.where(mask, values, torch.zeros_like(values)).sum(-1) / n_tok.clamp(min=1)
    total = per_seq.sum()
    return total / _denominator((n_tok > 0).sum(), normalizer, total)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def _seq_mean_token_sum(
    values: torch.Tensor, mask: torch.Tensor, norm: float | None = None, normalizer=None
) -> torch.Tensor:
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / _denominator((mask.sum(-1) > 0).sum(), normalizer, total)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(
    values: torch.Tensor, mask: torch.Tensor, norm: float | None = None, normalizer=None
) -> torch.Tensor:
    norm = float(values.shape[-1]) if norm is None else float(norm)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / (_denominator((mask.sum(-1) > 0).sum(), normalizer, total) * norm)


TOKEN_MODES = frozenset({"token-mean"})
"""Aggregations whose normaliser counts model tokens; every other mode counts sequences with >= 1 model token."""


def aggregate_loss(
    values: torch.Tensor, mask: torch.Tensor, mode: str, norm: float | None = None, normalizer=None
) -> torch.Tensor:
    """Reduce per-token ``values[B, T]`` over the bool ``mask[B, T]`` with aggregation ``mode``.

    ``normalizer`` (float or 0-dim tensor): the whole optimizer step's count (:func:`loss_normalizer` summed over
    micro-batches and data-parallel ranks) replacing the local count in the denominator; None keeps the local one.
    """
    return LOSS_AGGREGATIONS.get(mode)(values, mask.bool(), norm, normalizer)


def loss_normalizer(action_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """This micro-batch's share of the normaliser of aggregation ``mode`` (int64 0-dim tensor, mask's device).

    ``token-mean``: the number of model tokens; ``seq-mean-*``: the number of sequences with at least one model
    token. Sum it over the optimizer step's micro-batches and all-reduce (SUM) it over the data-parallel group,
    then pass the total as ``normalizer=`` to the loss (or use :func:`step_normalizers`, which does all of it).
    """
    if mode not in LOSS_AGGREGATIONS:
        valid = ", ".join(LOSS_AGGREGATIONS.names())
        raise KeyError(f"loss_normalizer: unknown aggregation {mode!r} (valid: {valid})")
    mask = action_mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"loss_normalizer: action_mask must be [B, T], got shape {tuple(mask.shape)}")
    return mask.sum() if mode in TOKEN_MODES else (mask.sum(-1) > 0).sum()


def _nonnegative_sequences(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` True for sequences none of whose model tokens has a negative advantage (SAPO's A_i >= 0)."""
    return torch.where(mask, adv, torch.full_like(adv, float("inf"))).amin(-1, keepdim=True) >= 0


def sapo_normalizer(action_mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of SAPO's KL denominator: model tokens of non-negative-advantage sequences.

    ``advantages`` is ``[B]`` or ``[B, T]`` as for the loss. int64 0-dim tensor; sum/all-reduce like
    :func:`loss_normalizer` and pass the total as ``sapo_normalizer=``.
    """
    mask = action_mask.bool()
    adv = advantages[:, None].expand(mask.shape) if advantages.dim() == 1 else advantages
    adv = adv.detach().to(torch.float32)
    return (mask & _nonnegative_sequences(adv, mask)).sum()


def step_normalizers(micro_batches: Iterable, loss: PolicyLoss | PolicyLossConfig, group=None,
                     device=None) -> dict[str, torch.Tensor]:
    """The global normalisers of one optimizer step, ready to pass to the loss as ``**kwargs``.

    Args:
        micro_batches: iterable of ``(action_mask[B, T], advantages[B] or [B, T])``, every micro-batch of the
            step on this rank.
        loss: the :class:`PolicyLoss` (its ``normalizers`` say which counts it needs); a bare
            :class:`PolicyLossConfig` is read as the built-in clipped loss with that config.
        group: the data-parallel process group; when ``torch.distributed`` is initialised the counts are
            all-reduced (SUM) over it (``None`` = the default group). Every rank of the group must call this.
        device: device of the all-reduced tensor (NCCL needs CUDA); default: the first mask's device.
    Returns:
        ``{keyword: count}`` (float64 0-dim tensors), e.g. ``{"normalizer": n}`` plus ``"sapo_normalizer"`` for
        a SAPO term.
    """
    if isinstance(loss, PolicyLossConfig):
        loss = ClippedPolicyLoss("policy loss", loss)
    keys: list[str] | None = None
    counts = None
    for mask, adv in micro_batches:
        local = loss.normalizers(mask, adv)
        if keys is None:
            keys = list(local)
        elif list(local) != keys:
            raise ValueError(f"step_normalizers: the loss returned keys {list(local)} after {keys}")
        vec = torch.stack([torch.as_tensor(local[k]) for k in keys]).to(torch.float64)
        counts = vec if counts is None else counts + vec.to(counts.device)
        device = device if device is not None else mask.device
    if counts is None or keys is None:
        raise ValueError("step_normalizers: no micro-batches")
    if not keys:
        return {}
    counts = counts.to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return {k: counts[i] for i, k in enumerate(keys)}


ADDITIVE_METRICS = ("loss", "pg_loss", "kl_loss", "sapo_penalty")
"""Metrics that, when the loss is called with ``normalizer=``, are this micro-batch's *share* of the step's value:
sum them over micro-batches and data-parallel ranks (every other metric is a local mean)."""


# --------------------------------------------------------------------------------------------- config
@dataclass
class PolicyLossConfig:
    """Configuration of a clipped policy-gradient loss; every loss name fills its own defaults."""

    ratio_level: str = "token"
    """``"token"`` (PPO/GRPO/DAPO/SAPO) or ``"sequence"`` (GSPO/DSPO: length-normalised sequence ratio)."""
    clip_low: float = 0.2
    """Lower clip epsilon: the ratio is clipped at ``1 - clip_low``."""
    clip_high: float = 0.2
    """Upper clip epsilon: the ratio is clipped at ``1 + clip_high`` (DAPO's clip-higher sets it above clip_low)."""
    dual_clip: float | None = None
    """Dual-clip constant ``c > 1`` capping the loss of negative-advantage tokens at ``-c A``; None disables."""
    loss_agg: str = "token-mean"
    """``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum`` or ``seq-mean-token-sum-norm``."""
    loss_agg_norm: float | None = None
    """Normaliser of ``seq-mean-token-sum-norm`` (e.g. the max response length); None uses the padded ``T``."""
    sapo_threshold: float = 0.5
    """SAPO ``t``: a positive-advantage token with ratio ``<= t`` counts as drifted (also used by diagnostics)."""
    sapo_coef: float = 0.0
    """SAPO ``w``: weight of the conditional KL term (0 disables it; the ``sapo`` loss defaults to 0.5)."""
    kl_coef: float = 0.0
    """Weight of the KL-to-reference loss term; > 0 requires ``ref_log_probs`` at call time."""
    kl_estimator: str = "k3"
    """KL estimator for the reference term: ``k1``, ``k2`` or ``k3`` (Schulman 2020)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (subtracted from the loss); > 0 requires ``entropy`` at call time."""
    log_ratio_clamp: float = 20.0
    """``|log r|`` is clamped to this before ``exp`` so ratios never overflow (gradient is 0 beyond it)."""

    def validate(self, name: str = "policy loss") -> PolicyLossConfig:
        """Raise ``ValueError`` naming the offending field if the config is inconsistent; return ``self``."""
        problems = []
        if self.ratio_level not in ("token", "sequence"):
            problems.append(f"ratio_level={self.ratio_level!r} (expected 'token' or 'sequence')")
        if not 0.0 <= self.clip_low < 1.0:
            problems.append(f"clip_low={self.clip_low} (expected 0 <= clip_low < 1)")
        if self.clip_high < 0.0:
            problems.append(f"clip_high={self.clip_high} (expected >= 0)")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            problems.append(f"dual_clip={self.dual_clip} (expected a constant > 1, or None)")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            problems.append(f"loss_agg={self.loss_agg!r} (valid: {', '.join(LOSS_AGGREGATIONS.names())})")
        if self.loss_agg_norm is not None and not self.loss_agg_norm > 0:
            problems.append(f"loss_agg_norm={self.loss_agg_norm} (expected > 0)")
        if not 0.0 < self.sapo_threshold <= 1.0:
            problems.append(f"sapo_threshold={self.sapo_threshold} (expected 0 < t <= 1)")
        for field in ("sapo_coef", "kl_coef", "entropy_coef"):
            if getattr(self, field) < 0:
                problems.append(f"{field}={getattr(self, field)} (expected >= 0)")
        if self.kl_estimator not in KL_ESTIMATORS:
            problems.append(f"kl_estimator={self.kl_estimator!r} (valid: {', '.join(KL_ESTIMATORS.names())})")
        if not self.log_ratio_clamp > 0:
            problems.append(f"log_ratio_clamp={self.log_ratio_clamp} (expected > 0)")
        if problems:
            raise ValueError(f"{name}: invalid config: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------- the protocol
@runtime_checkable
class PolicyLoss(Protocol):
    """What every backend (local trainer, OpenRLHF adapter, Megatron actor) may ask of a policy loss.

    A backend reads nothing else: it never inspects the config's fields, so a loss with hyperparameters of its own
    runs everywhere once registered (:func:`register_policy_loss`).
    """

    config: Any
    """The loss's typed configuration (a dataclass; the built-ins use :class:`PolicyLossConfig`), validated."""
    needs_behaviour_log_probs: bool
    """True when the call needs ``behaviour_log_probs=[B, T]`` (the rollout engine's log-probs: ``+tis``/``+mis``)."""

    @property
    def needs_ref_log_probs(self) -> bool:
        """True when the call needs ``ref_log_probs=[B, T]`` (a KL-to-reference term)."""
        ...

    @property
    def needs_entropy(self) -> bool:
        """True when the call needs ``entropy=[B, T]`` (an entropy bonus)."""
        ...

    def normalizers(self, action_mask: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """This micro-batch's share of every normaliser the loss divides by, keyed by the keyword the call takes.

        ``action_mask`` ``[B, T]``, ``advantages`` ``[B]`` or ``[B, T]``; values are 0-dim counts. A backend sums them
        over the optimizer step's micro-batches and all-reduces (SUM) over the data-parallel group
        (:func:`step_normalizers`), then passes the totals to every micro-batch's call (the distributed note in the
        module docstring). An empty dict means the loss wants none (each call is then a local mean).
        """
        ...

    def __call__(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                 action_mask: torch.Tensor, **extra: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, metrics)``: a scalar loss and Python-float metrics (see the module docstring for ``extra``)."""
        ...


class ClippedPolicyLoss:
    """The built-in clipped surrogate as a :class:`PolicyLoss` (every registered built-in name is one).

    Subclass it for a loss with hyperparameters of its own: set :attr:`config_class` to a dataclass extending
    :class:`PolicyLossConfig` with the new fields (its ``validate`` checks them too), override :meth:`__call__`
    (and :meth:`normalizers` if the new term divides by another count), and register a factory that calls
    :meth:`build`.
    """

    config_class: ClassVar[type] = PolicyLossConfig
    """The config dataclass :meth:`build` fills (defaults, then the user's keys) and validates."""
    needs_behaviour_log_probs = False

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config
        self.__name__ = f"{name}_loss"

    @classmethod
    def build(cls, name: str, defaults: dict | None = None, **cfg) -> ClippedPolicyLoss:
        """The loss ``name`` with ``defaults`` overridden by ``cfg`` (``TypeError`` naming unknown keys and listing
        the valid ones; ``ValueError`` from the config's ``validate``)."""
        valid = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise TypeError(f"policy loss {name!r}: unknown config key(s) {unknown}; valid keys: {sorted(valid)}")
        config = cls.config_class(**{**(defaults or {}), **cfg})
        return cls(name, config.validate(f"policy loss {name!r}"))

    @property
    def needs_ref_log_probs(self) -> bool:
        return self.config.kl_coef > 0

    @property
    def needs_entropy(self) -> bool:
        return self.config.entropy_coef > 0

    def normalizers(self, action_mask: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """The aggregation's count (:func:`loss_normalizer`), plus SAPO's (:func:`sapo_normalizer`) when
        ``sapo_coef > 0``."""
        out = {"normalizer": loss_normalizer(action_mask, self.config.loss_agg)}
        if self.config.sapo_coef > 0:
            out["sapo_normalizer"] = sapo_normalizer(action_mask, advantages)
        return out

    def __call__(self, log_probs, old_log_probs, advantages, action_mask, **extra):
        return clipped_policy_loss(log_probs, old_log_probs, advantages, action_mask, self.config, **extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.config})"


# --------------------------------------------------------------------------------------------- registry
POLICY_LOSSES: Registry[Callable[..., PolicyLoss]] = Registry(
    "policy loss", hints={k: "Note: 'sapo' here is Search Agent PO (arXiv 2603.10069), not verl/TRL/AReaL's Soft "
                          "Adaptive PO (arXiv 2511.20347)." for k in ("soft", "adaptive", "sapo")})


def register_policy_loss(name: str):
    """Register a factory ``factory(**cfg) -> PolicyLoss`` (e.g. ``lambda **cfg: MyLoss.build("mine", **cfg)``)."""
    return POLICY_LOSSES.register(name)


def get_policy_loss(name: str, **cfg) -> PolicyLoss:
    """Build the policy loss ``name`` with config overrides ``cfg`` (fields of the loss's config dataclass).

    The result is callable as ``fn(log_probs, old_log_probs, advantages, action_mask, **extra) -> (loss, metrics)``
    and meets :class:`PolicyLoss`. Unknown names raise ``KeyError`` listing the valid ones; unknown or invalid
    config keys raise ``TypeError``/``ValueError`` naming the field.
    """
    return POLICY_LOSSES.get(name)(**cfg)


def default_loss_config(name: str) -> dict:
    """The defaults the built-in loss ``name`` applies on top of :class:`PolicyLossConfig` (for docs and presets)."""
    return dict(_DEFAULTS[name])


_DEFAULTS: dict[str, dict] = {
    "ppo": {},
    "grpo": {},
    "dapo": {"clip_low": 0.2, "clip_high": 0.28, "loss_agg": "token-mean"},
    "gspo": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
    "dspo": {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
    "sapo": {"sapo_threshold": 0.5, "sapo_coef": 0.5},
}


def make_config(name: str, **cfg) -> Any:
    """The validated config of the registered loss ``name`` with overrides ``cfg`` (its own dataclass: a plugin's
    hyperparameters included); raises like :func:`get_policy_loss`."""
    return get_policy_loss(name, **cfg).config


def _make_factory(name: str):
    def factory(**cfg) -> PolicyLoss:
        return ClippedPolicyLoss.build(name, _DEFAULTS[name], **cfg)

    factory.__doc__ = f"Build the {name!r} loss; defaults {_DEFAULTS[name]} over PolicyLossConfig."
    return factory


for _name in _DEFAULTS:
    register_policy_loss(_name)(_make_factory(_name))


# --------------------------------------------------------------------------------------------- the loss
def _check_inputs(log_probs, old_log_probs, advantages, action_mask) -> tuple[torch.Tensor, torch.Tensor]:
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [B, T], got shape {tuple(log_probs.shape)}")
    shape = log_probs.shape
    for label, t in (("old_log_probs", old_log_probs), ("action_mask", action_mask)):
        if t.shape != shape:
            raise ValueError(f"{label} has shape {tuple(t.shape)}, expected {tuple(shape)} like log_probs")
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise ValueError(f"advantages [B] has length {advantages.shape[0]}, expected B={shape[0]}")
        advantages = advantages[:, None].expand(shape)
    elif advantages.shape != shape:
        raise ValueError(f"advantages must be [B] or [B, T]={tuple(shape)}, got {tuple(advantages.shape)}")
    return advantages, action_mask.bool()


def clipped_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    config: PolicyLossConfig,
    *,
    ref_log_probs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    sapo_normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The shared clipped surrogate behind every built-in loss name (see the module docstring).

    Args:
        log_probs: ``[B, T]`` current log-probs (differentiable).
        old_log_probs: ``[B, T]`` rollout-policy log-probs (detached here).
        advantages: ``[B]`` or ``[B, T]`` advantages (detached here).
        action_mask: ``[B, T]`` True on model tokens.
        config: a validated :class:`PolicyLossConfig`.
        ref_log_probs: ``[B, T]`` reference log-probs, required when ``config.kl_coef > 0``.
        entropy: ``[B, T]`` token entropies, required when ``config.entropy_coef > 0`` (else only logged).
        normalizer: the whole optimizer step's count (model tokens for ``token-mean``, sequences with >= 1 model
            token for ``seq-mean-*``; :func:`loss_normalizer` summed over micro-batches and data-parallel ranks).
            Every aggregate (policy, KL and entropy terms) then divides its sum by it instead of the local count,
            so the sum of the micro-batch losses is the step's loss. None: local means (unchanged behaviour).
        sapo_normalizer: the step's count of model tokens of non-negative-advantage sequences
            (:func:`sapo_normalizer` summed likewise), the denominator of SAPO's KL term; required when
            ``normalizer`` is given and ``config.sapo_coef > 0``.
    Returns:
        ``(loss, metrics)`` with a scalar loss and a dict of Python floats; with ``normalizer`` the metrics in
        :data:`ADDITIVE_METRICS` are this micro-batch's share of the step's value.
    """
    cfg = config
    advantages, mask = _check_inputs(log_probs, old_log_probs, advantages, action_mask)
    # bf16/fp16 log-probs would make exp(log ratio) coarse: compute the loss in (at least) float32
    log_probs = log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))
    zeros = torch.zeros_like(log_probs)
    adv = torch.where(mask, advantages.detach().to(log_probs.dtype), zeros)
    old = old_log_probs.detach().to(log_probs.dtype)

    # log r_t on model tokens only; masked positions are *selected* to 0 so NaN/inf there cannot leak.
    log_ratio = torch.where(mask, log_probs - old, zeros).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    token_ratio = torch.exp(log_ratio)
    if cfg.ratio_level == "sequence":
        n_tok = mask.sum(-1, keepdim=True).clamp(min=1)
        seq_log_ratio = log_ratio.sum(-1, keepdim=True) / n_tok  # log s_i = mean_t log r_t (model tokens only)
        # GSPO-token form: value s_i, gradient s_i * grad log pi(y_t).
        ratio = torch.exp(seq_log_ratio.detach() + log_ratio - log_ratio.detach())
    else:
        ratio = token_ratio

    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if cfg.dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip), pg)
    if normalizer is not None and cfg.sapo_coef > 0 and sapo_normalizer is None:
        raise ValueError(
            "a global normalizer with sapo_coef > 0 also needs sapo_normalizer= (the step's model tokens of "
            "non-negative-advantage sequences: losses.step_normalizers or losses.sapo_normalizer)"
        )
    pg_loss = aggregate_loss(pg, mask, cfg.loss_agg, cfg.loss_agg_norm, normalizer)
    loss = pg_loss

    # SAPO conditional KL: k1 of KL(old || theta) on drifted tokens of sequences with advantage >= 0, divided by all
    # model tokens of those sequences. A sequence counts as non-negative when none of its model tokens has A < 0:
    # exactly "A_i >= 0" for sequence advantages, and with CalibAdv token advantages a failed rollout whose good
    # search turns were zeroed still counts as negative (its zeroed tokens are neither pulled up nor counted).
    pos_seq_tok = mask & _nonnegative_sequences(adv, mask)
    drifted = pos_seq_tok & (token_ratio.detach() <= cfg.sapo_threshold)
    sapo_sum = torch.where(drifted, -log_ratio, zeros).sum()
    sapo_term = sapo_sum / _denominator(pos_seq_tok.sum(), sapo_normalizer, sapo_sum)
    if cfg.sapo_coef > 0:
        loss = loss + cfg.sapo_coef * sapo_term

    metrics: dict[str, float] = {}
    if cfg.kl_coef > 0:
        if ref_log_probs is None:
            raise ValueError("kl_coef > 0 needs ref_log_probs=[B, T] (the reference policy's log-probs)")
        kl_tok = kl_penalty(log_probs, ref_log_probs.detach(), mask, cfg.kl_estimator, cfg.log_ratio_clamp)
        kl_loss = aggregate_loss(kl_tok, mask, cfg.loss_agg, cfg.loss_agg_norm, normalizer)
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.item()
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs entropy=[B, T] (token entropies, differentiable)")
        loss = loss - cfg.entropy_coef * aggregate_loss(entropy, mask, cfg.loss_agg, cfg.loss_agg_norm, normalizer)

    metrics.update(
        loss=loss.item(),
        pg_loss=pg_loss.item(),
        sapo_penalty=sapo_term.item(),
        sapo_token_share=(drifted.sum() / pos_seq_tok.sum().clamp(min=1)).item(),
    )
    metrics.update(
        policy_diagnostics(
            ratio,
            adv,
            mask,
            log_probs,
            old,
            token_ratio=token_ratio,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            drift_threshold=cfg.sapo_threshold,
            ref_log_probs=ref_log_probs,
            entropy=entropy,
        )
    )
    return loss, metrics
