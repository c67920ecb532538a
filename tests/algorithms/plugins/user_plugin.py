"""A user's plugin module (what a project outside openrlhf_search would write): registers an advantage estimator, an
advantage post-processor and a policy loss. Selected by listing this file in the config's ``plugins:``."""

import torch

from openrlhf_search.algorithms import get_policy_loss, register_advantage_estimator, register_policy_loss
from openrlhf_search.algorithms.postprocess import broadcast_advantages, register_advantage_postprocessor


@register_advantage_estimator("plugin_sign")
def sign_estimator(**cfg):
    """A = sign(R - mean of the group) (a deliberately simple, recognisable estimator)."""

    def fn(rewards, group_ids):
        out = torch.zeros_like(rewards)
        for g in torch.unique(group_ids):
            rows = group_ids == g
            out[rows] = torch.sign(rewards[rows] - rewards[rows].mean())
        return out

    return fn


sign_estimator.group_based = True


@register_advantage_postprocessor("plugin_scale")
def scale_postprocessor(factor: float = 2.0):
    """Multiply every token advantage by ``factor``; reports ``plugin/factor``."""

    def fn(advantages, action_mask, group_ids, records):
        return broadcast_advantages(advantages, action_mask) * factor, {"plugin/factor": factor}

    return fn


@register_policy_loss("plugin_ppo")
def plugin_ppo(**cfg):
    """PPO under another name (stands for a user's new loss)."""
    loss = get_policy_loss("ppo", **cfg)
    loss.plugin = True
    return loss
