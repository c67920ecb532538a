"""The algorithm core: advantage estimators, policy losses, DSPO filtering, CalibAdv, KL, chunked log-probs.

Pure PyTorch (imports nothing heavier than torch). The names below resolve on first access (PEP 562), so that
:mod:`.config` (the ``algorithm`` section of the training config) can be imported without torch by the config
loader and the light commands. Public API (binding, see docs/contracts.md and
docs/algorithms.md)::

    get_policy_loss(name, **cfg) -> fn(log_probs, old_log_probs, advantages, action_mask, **extra) -> (loss, metrics)
        (a PolicyLoss: .config, .normalizers(action_mask, advantages), .needs_*; ClippedPolicyLoss to extend)
    loss_normalizer(action_mask, mode) / step_normalizers(micro_batches, loss, group) -> the step's normalisers
    get_advantage_estimator(name, **cfg) -> fn(rewards[B], group_ids[B]) -> advantages[B]
    mixed_outcome_groups(rewards, group_ids) -> bool[B];  GroupBatcher(target_groups, max_rounds, on_cap)
    calibrate_advantages(seq_adv, records, action_mask, group_ids, cfg) -> (token_adv, metrics)
    apply_postprocessors(chain, adv, action_mask, group_ids, records) -> (token_adv, metrics)  (CalibAdv & plugins)
    get_algorithm(name) -> AlgorithmPreset
    sampled_token_logprobs / logprobs_from_logits / entropy_from_logits
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "get_advantage_estimator": "advantages", "register_advantage_estimator": "advantages",
    "CalibAdvConfig": "calibadv", "CalibRecord": "calibadv", "SearchTurn": "calibadv",
    "calibrate_advantages": "calibadv",
    "BatchNotFilledError": "filtering", "BatchReport": "filtering", "GroupBatch": "filtering",
    "GroupBatcher": "filtering", "mixed_outcome_groups": "filtering",
    "kl_penalty": "kl",
    "entropy_from_logits": "logprobs", "logprobs_from_logits": "logprobs", "sampled_token_logprobs": "logprobs",
    "ClippedPolicyLoss": "losses", "PolicyLoss": "losses", "PolicyLossConfig": "losses", "get_policy_loss": "losses",
    "loss_normalizer": "losses", "register_policy_loss": "losses", "sapo_normalizer": "losses",
    "step_normalizers": "losses",
    "ADVANTAGE_POSTPROCESSORS": "postprocess", "apply_postprocessors": "postprocess",
    "register_advantage_postprocessor": "postprocess",
    "AlgorithmPreset": "presets", "get_algorithm": "presets",
    "Registry": "registry",
    "AlgorithmConfig": "config",
}  # fmt: skip
"""Public name -> the submodule that defines it."""

__all__ = ["ADVANTAGE_POSTPROCESSORS", "AlgorithmConfig", "AlgorithmPreset", "BatchNotFilledError", "BatchReport",
           "CalibAdvConfig", "CalibRecord", "ClippedPolicyLoss", "GroupBatch", "GroupBatcher", "PolicyLoss",
           "PolicyLossConfig", "Registry", "SearchTurn", "apply_postprocessors", "calibrate_advantages",
           "entropy_from_logits", "get_advantage_estimator", "get_algorithm", "get_policy_loss", "kl_penalty",
           "logprobs_from_logits", "loss_normalizer", "mixed_outcome_groups", "register_advantage_estimator",
           "register_advantage_postprocessor", "register_policy_loss", "sampled_token_logprobs", "sapo_normalizer",
           "step_normalizers"]  # fmt: skip


def __getattr__(name: str):
    """Import the submodule that defines ``name`` (or the submodule ``name``) on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from .advantages import get_advantage_estimator, register_advantage_estimator
    from .calibadv import CalibAdvConfig, CalibRecord, SearchTurn, calibrate_advantages
    from .config import AlgorithmConfig
    from .filtering import BatchNotFilledError, BatchReport, GroupBatch, GroupBatcher, mixed_outcome_groups
    from .kl import kl_penalty
    from .logprobs import entropy_from_logits, logprobs_from_logits, sampled_token_logprobs
    from .losses import (
        ClippedPolicyLoss,
        PolicyLoss,
        PolicyLossConfig,
        get_policy_loss,
        loss_normalizer,
        register_policy_loss,
        sapo_normalizer,
        step_normalizers,
    )
    from .postprocess import ADVANTAGE_POSTPROCESSORS, apply_postprocessors, register_advantage_postprocessor
    from .presets import AlgorithmPreset, get_algorithm
    from .registry import Registry
