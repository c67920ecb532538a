"""The ``algorithm`` section of the training config: the preset, its loss/estimator/post-processor overrides, KL,
epochs and minibatches.

Declared here, next to the presets and registries it names (:func:`openrlhf_search.algorithms.presets.preset_for`
resolves it), and registered in :data:`openrlhf_search.config.SECTIONS`;
:class:`openrlhf_search.trainer.config.TrainConfig` embeds it. Torch-free (the package resolves its other names on
first access), so loading a config imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openrlhf_search.config import section


@section("algorithm")
@dataclass
class AlgorithmConfig:
    """The RL algorithm (``openrlhf_search.algorithms.get_algorithm``)."""

    name: str = "dspo"
    """Preset: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``dspo``, ``sapo``, ``calibadv`` or a ``+`` combination
    such as ``dspo+calibadv``. ``sapo`` is Search Agent PO, not Soft Adaptive PO (docs/algorithms.md, "Which
    SAPO?")."""
    policy_loss: str = ""
    """Policy loss name replacing the preset's (``openrlhf_search.algorithms.get_policy_loss`` registry, a plugin's
    included; its config is ``loss_overrides``); empty = the preset's."""
    advantage_estimator: str = ""
    """Advantage estimator name replacing the preset's (``grpo``, ``dr_grpo``, ``rloo`` or one a plugin registers;
    empty = the preset's)."""
    estimator_config: dict[str, Any] = field(default_factory=dict)
    """Keyword config of the advantage estimator (e.g. ``{eps: 1e-6}``)."""
    advantage_postprocessors: list[str] = field(default_factory=list)
    """Advantage post-processors run after the estimator, in order (``calibadv`` or plugin names; a preset with
    ``calibadv`` puts it first)."""
    postprocessor_config: dict[str, dict] = field(default_factory=dict)
    """Per post-processor keyword config, e.g. ``{calibadv: {silver_f1_threshold: 0.5}}`` (CalibAdv's
    ``target_ratio`` defaults to ``calib_lambda``)."""
    loss_overrides: dict[str, Any] = field(default_factory=dict)
    """Loss config overriding the preset (``clip_low``, ``clip_high``, ``sapo_threshold``, ``sapo_coef``...)."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to a frozen reference copy of the initial policy (0 = no reference model)."""
    kl_estimator: str = "k3"
    """KL estimator (``k1``, ``k2``, ``k3``)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 2
    """Optimizer steps per epoch (the batch is split into this many minibatches)."""
    micro_batches: int = 1
    """Gradient-accumulation micro-batches per minibatch (memory only: the loss is normalised over the whole
    minibatch, ``algorithms.step_normalizers``, so the step does not depend on this number)."""
    calib_lambda: float = 1.0
    """CalibAdv's lambda (positive/negative mass balance)."""
