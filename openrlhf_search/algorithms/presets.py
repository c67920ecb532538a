"""User-facing algorithm names -> (advantage estimator, policy loss, loss config, filtering, CalibAdv).

``get_algorithm(name)`` is read by both the local trainer and the OpenRLHF launcher, so a name means the same
thing on every backend.

Base algorithms (exactly one per name; ``grpo`` if only modifiers are given):

=========  =============  ===========  =======================================================  ==============
name       estimator      loss         loss config                                              dyn. filter
=========  =============  ===========  =======================================================  ==============
grpo       grpo           grpo         clip 0.2/0.2, token-mean                                 no
dr_grpo    dr_grpo        grpo         clip 0.2/0.2, seq-mean-token-sum-norm                    no
dapo       grpo           dapo         clip 0.2/0.28, token-mean                                yes
gspo       grpo           gspo         sequence ratio, clip 3e-4/4e-4, seq-mean-token-mean      no
dspo       grpo           dspo         as gspo                                                  yes
sapo       grpo           sapo         ppo + SAPO term (t=0.5, w=0.5; ours, see losses.py)      no
=========  =============  ===========  =======================================================  ==============

``dr_grpo`` divides token sums by ``loss_agg_norm``; without it, by the padded length ``T`` of the micro-batch.
Dr. GRPO uses a constant (the generation budget): trainers should pass
``build_loss(loss_agg_norm=max_response_tokens)``.

``sapo`` is **Search Agent PO** (arXiv 2603.10069); which SAPO this is not: :data:`SAPO_NOTE`.

Modifiers (any number, after or before the base, joined with ``+``):

* ``calibadv`` -- apply :func:`.calibadv.calibrate_advantages` between the estimator and the loss
  (``calibadv`` alone means ``grpo+calibadv``, the paper's setting);
* ``filter`` -- turn on dynamic (mixed-outcome) group filtering, e.g. ``sapo+filter``;
* ``tis`` / ``mis`` (at most one) -- behaviour/proximal off-policy correction of the loss
  (:mod:`.offpolicy`: truncated or masked importance sampling; the trainer passes the engine's log-probs).

Combination rule: ``"a+b+..."`` is split on ``+``; order does not matter; at most one base algorithm; a name may
not repeat; the base fixes estimator, loss and loss config, modifiers only switch flags on. Examples:
``dspo+calibadv`` (sequence ratio + filtering + calibrated token advantages), ``sapo+calibadv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from openrlhf_search.registry import UnknownNameError, did_you_mean

from .advantages import ADVANTAGE_ESTIMATORS
from .losses import _DEFAULTS as _BUILTIN_LOSS_DEFAULTS
from .losses import POLICY_LOSSES, default_loss_config

SAPO_NOTE = (
    "Note: 'sapo' here is Search Agent Policy Optimization (arXiv 2603.10069: PPO + a conditional KL term on drifted "
    "positive tokens), NOT Soft Adaptive Policy Optimization (arXiv 2511.20347), which verl, TRL and AReaL call "
    "'sapo'; Soft Adaptive PO is not implemented here (register it as a loss from a plugin module)."
)
"""Said wherever a user chooses ``sapo`` or a near miss of it (help text, docs, the unknown-name error)."""

NEAR_MISS_HINTS = {"soft": SAPO_NOTE, "adaptive": SAPO_NOTE, "sapo": SAPO_NOTE}
"""Near-miss patterns of algorithm/loss names -> extra sentence of the unknown-name error."""


@dataclass(frozen=True)
class AlgorithmPreset:
    """Everything a trainer needs to run one algorithm."""

    name: str
    """Canonical name (components sorted: base first, then modifiers alphabetically)."""
    advantage_estimator: str
    """Name for :func:`get_advantage_estimator`."""
    policy_loss: str
    """Name for :func:`get_policy_loss`."""
    loss_cfg: dict = field(default_factory=dict)
    """Keyword overrides for :func:`get_policy_loss` (already includes the loss's own defaults)."""
    advantage_cfg: dict = field(default_factory=dict)
    """Keyword config for the advantage estimator."""
    dynamic_filter: bool = False
    """Keep only mixed-outcome groups and refill the batch (:class:`GroupBatcher`)."""
    calibadv: bool = False
    """Calibrate token advantages with CalibAdv before the loss (needs CalibRecords from the environment)."""
    description: str = ""
    """One line for ``--help`` and logs."""
    offpolicy: str = ""
    """``"tis"``/``"mis"``: wrap the loss with :func:`.offpolicy.with_offpolicy_correction` (needs engine logprobs)."""

    def build_loss(self, offpolicy_cfg: dict | None = None, **overrides):
        """The configured policy loss, with optional config overrides (e.g. from the CLI).

        ``offpolicy_cfg``: fields of :class:`.offpolicy.OffPolicyConfig` (e.g. ``tis_cap``) for ``+tis``/``+mis``.
        """
        from .losses import get_policy_loss

        loss = get_policy_loss(self.policy_loss, **{**self.loss_cfg, **overrides})
        if self.offpolicy:
            from .offpolicy import with_offpolicy_correction

            loss = with_offpolicy_correction(loss, self.offpolicy, **(offpolicy_cfg or {}))
        return loss

    def build_estimator(self, **overrides):
        """The configured advantage estimator."""
        from .advantages import get_advantage_estimator

        return get_advantage_estimator(self.advantage_estimator, **{**self.advantage_cfg, **overrides})


def _base(name, estimator, loss, extra=None, dynamic_filter=False, description=""):
    return AlgorithmPreset(
        name=name,
        advantage_estimator=estimator,
        policy_loss=loss,
        loss_cfg={**default_loss_config(loss), **(extra or {})},
        dynamic_filter=dynamic_filter,
        description=description,
    )


BASE_ALGORITHMS: dict[str, AlgorithmPreset] = {
    p.name: p
    for p in (
        _base("grpo", "grpo", "grpo", description="GRPO: group-normalised outcome advantage, token-level PPO clip"),
        _base(
            "dr_grpo",
            "dr_grpo",
            "grpo",
            {"loss_agg": "seq-mean-token-sum-norm"},
            description="Dr. GRPO: no std division, token sums / a constant (set loss_agg_norm = max length)",
        ),
        _base("dapo", "grpo", "dapo", dynamic_filter=True, description="DAPO: clip-higher + dynamic sampling"),
        _base("gspo", "grpo", "gspo", description="GSPO: sequence-level ratio, tight clip, sequence-mean"),
        _base("dspo", "grpo", "dspo", dynamic_filter=True, description="DSPO: GSPO loss + mixed-outcome filtering"),
        _base("sapo", "grpo", "sapo", description="SAPO = Search Agent PO (arXiv 2603.10069): PPO + conditional KL "
              "on drifted positive tokens (not Soft Adaptive PO)"),
    )
}

MODIFIERS = ("calibadv", "filter", "mis", "tis")


def algorithm_names() -> list[str]:
    """Base names and modifiers that :func:`get_algorithm` accepts (combine with ``+``)."""
    return sorted(BASE_ALGORITHMS) + list(MODIFIERS)


def get_algorithm(name: str) -> AlgorithmPreset:
    """Resolve ``name`` (e.g. ``"dspo"``, ``"calibadv"``, ``"sapo+calibadv"``) to an :class:`AlgorithmPreset`."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"algorithm name must be a non-empty string, got {name!r}")
    parts = [p.strip().lower() for p in name.split("+")]
    valid = ", ".join(algorithm_names())
    if any(not p for p in parts):
        raise ValueError(f"algorithm {name!r}: empty component; valid components: {valid}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"algorithm {name!r}: a component is repeated")
    unknown = [p for p in parts if p not in BASE_ALGORITHMS and p not in MODIFIERS]
    if unknown:
        hints = "".join(did_you_mean(p, algorithm_names()) for p in unknown)
        notes = "".join(dict.fromkeys(h for p in unknown for k, h in NEAR_MISS_HINTS.items() if k in p))
        raise UnknownNameError(f"algorithm {name!r}: unknown component(s) {unknown}{hints}; valid components: "
                               f"{valid} (combine with '+', e.g. dspo+calibadv)" + (f". {notes}" if notes else ""))
    bases = [p for p in parts if p in BASE_ALGORITHMS]
    if len(bases) > 1:
        raise ValueError(f"algorithm {name!r}: at most one base algorithm, got {bases} (modifiers: {MODIFIERS})")
    mods = sorted(p for p in parts if p in MODIFIERS)
    if "tis" in mods and "mis" in mods:
        raise ValueError(f"algorithm {name!r}: at most one off-policy correction (tis or mis)")
    base = BASE_ALGORITHMS[bases[0] if bases else "grpo"]
    assert base.advantage_estimator in ADVANTAGE_ESTIMATORS and base.policy_loss in POLICY_LOSSES
    canonical = "+".join(([base.name] if bases or not mods else ["grpo"]) + mods)
    if not bases and mods == ["calibadv"]:
        canonical = "calibadv"
    return replace(
        base,
        name=canonical,
        loss_cfg=dict(base.loss_cfg),
        calibadv=base.calibadv or "calibadv" in mods,
        dynamic_filter=base.dynamic_filter or "filter" in mods,
        offpolicy=next((m for m in mods if m in ("tis", "mis")), ""),
        description=base.description + "".join(f" + {m}" for m in mods),
    )


def preset_for(algorithm: object) -> AlgorithmPreset:
    """The preset of a config's ``algorithm`` section: :func:`get_algorithm` of ``algorithm.name``, with
    ``algorithm.policy_loss`` (when set) replacing the preset's loss (and its loss defaults). Every backend resolves
    the section through this function and :func:`advantage_pipeline`."""
    preset = get_algorithm(algorithm.name)
    loss = getattr(algorithm, "policy_loss", "") or ""
    if loss and loss != preset.policy_loss:
        POLICY_LOSSES.get(loss)  # unknown names fail here, with "did you mean"
        defaults = default_loss_config(loss) if loss in _BUILTIN_LOSS_DEFAULTS else {}
        preset = replace(preset, policy_loss=loss, loss_cfg=defaults,
                         description=f"{preset.description} (policy loss {loss})")
    return preset


def advantage_pipeline(preset: AlgorithmPreset, algorithm: object = None) -> tuple[str, dict, list[tuple[str, dict]]]:
    """``(estimator, estimator_config, post-processor chain)`` of a preset and the config's ``algorithm`` section.

    The ONE resolution every backend uses (local trainer, OpenRLHF patch, hence Megatron too):
    ``algorithm.advantage_estimator`` replaces the preset's estimator when set; the chain is ``calibadv`` first when
    the preset has it (CalibAdv needs outcome advantages), then ``algorithm.advantage_postprocessors`` in order, each
    with its ``algorithm.postprocessor_config`` entry (CalibAdv's ``target_ratio`` defaults to ``calib_lambda``).
    """
    estimator = getattr(algorithm, "advantage_estimator", "") or preset.advantage_estimator
    estimator_cfg = {**preset.advantage_cfg, **(getattr(algorithm, "estimator_config", None) or {})}
    extra = list(getattr(algorithm, "advantage_postprocessors", None) or [])
    names = (["calibadv"] if preset.calibadv else []) + [n for n in extra if not (n == "calibadv" and preset.calibadv)]
    per_name = getattr(algorithm, "postprocessor_config", None) or {}
    chain = []
    for name in names:
        cfg = dict(per_name.get(name) or {})
        if name == "calibadv":
            cfg.setdefault("target_ratio", float(getattr(algorithm, "calib_lambda", 1.0)))
        chain.append((name, cfg))
    return estimator, estimator_cfg, chain
