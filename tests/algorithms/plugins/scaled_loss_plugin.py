"""A user's policy loss with a hyperparameter of its own (what a project outside openrlhf_search would write): one
file, one registration. Selected by listing this file in ``plugins:`` and naming the loss in the config::

    plugins: [path/to/scaled_loss_plugin.py]
    algorithm: {name: grpo, policy_loss: scaled_adv, loss_overrides: {adv_scale: 3.0}}

``adv_scale`` is not a :class:`PolicyLossConfig` field: the backends never read it, they only ask the loss (the
:class:`~openrlhf_search.algorithms.losses.PolicyLoss` protocol). The loss is GRPO's clipped surrogate on
``adv_scale x A``; the clipped surrogate is linear in ``A``, so the loss and its gradient are ``adv_scale`` times
GRPO's, and the metric ``adv_scale`` reports the value the loss was built with.
"""

from __future__ import annotations

from dataclasses import dataclass

from openrlhf_search.algorithms.losses import ClippedPolicyLoss, PolicyLossConfig, register_policy_loss


@dataclass
class ScaledAdvantageConfig(PolicyLossConfig):
    """:class:`PolicyLossConfig` plus the advantage multiplier."""

    adv_scale: float = 1.0
    """Multiplier of every advantage before the clipped surrogate (> 0)."""

    def validate(self, name: str = "policy loss") -> ScaledAdvantageConfig:
        if not self.adv_scale > 0:
            raise ValueError(f"{name}: invalid config: adv_scale={self.adv_scale} (expected > 0)")
        super().validate(name)
        return self


class ScaledAdvantageLoss(ClippedPolicyLoss):
    """GRPO's loss on ``adv_scale x A``."""

    config_class = ScaledAdvantageConfig

    def __call__(self, log_probs, old_log_probs, advantages, action_mask, **extra):
        loss, metrics = super().__call__(log_probs, old_log_probs, advantages * self.config.adv_scale, action_mask,
                                         **extra)  # fmt: skip
        metrics["adv_scale"] = float(self.config.adv_scale)
        return loss, metrics


@register_policy_loss("scaled_adv")
def scaled_adv(**cfg) -> ScaledAdvantageLoss:
    """The ``scaled_adv`` loss (``cfg``: fields of :class:`ScaledAdvantageConfig`)."""
    return ScaledAdvantageLoss.build("scaled_adv", **cfg)
