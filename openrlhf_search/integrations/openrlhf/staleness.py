"""Weight versions and per-sample staleness on the OpenRLHF backend (OpenRLHF-free; issue 13).

OpenRLHF 0.11.2 records no policy version anywhere: its asynchronous trainer (``--train.async_enable``) trains batch
``k`` while the generator samples batch ``k + 1`` with the previous weights, and with
``--train.partial_rollout_enable`` a weight broadcast lands while trajectories are in flight (vLLM
``pause_generation(mode="keep")``: in-flight requests resume under the new weights with their KV cache). What we add:

* **the version counter** -- the patched trainer (``patches.SearchPPOTrainer`` / ``SearchTrainingActor``) counts its
  weight broadcasts; after each one, *before* OpenRLHF resumes generation, it sets the count on every vLLM rollout
  actor (:func:`set_engine_version`, sent with Ray's ``__ray_call__``). Version ``v`` = the weights after ``v``
  updates of this run (``0`` = the initial model; after a resume, ``1`` = the restored weights);
* **per-turn tags** -- the agent runs inside that actor (OpenRLHF hands the executor the actor itself as
  ``llm_engine``), so :class:`.agent_core.TurnCappedEngine` reads :func:`engine_version` before and after each
  turn's generation, at no cost. Per-token versions are *not* available: a turn interrupted by a broadcast (partial
  rollouts) has tokens of both versions and we only know the bounds. A trajectory's tags travel as two scalars
  (OpenRLHF turns ``extra_logs`` into one scalar per key): :data:`VERSION_MIN_KEY` (the version at the start of its
  first turn: the oldest version of any of its tokens) and :data:`VERSION_MAX_KEY` (the version at the end of its
  last turn);
* **staleness** -- in the trainer's experience maker, :func:`tag_staleness` computes per sample
  ``trainer version - VERSION_MIN_KEY`` (the trainer version = its broadcasts so far = the version of the weights it
  trains and computes ``old_log_probs`` with) and logs ``async/staleness`` (OpenRLHF averages per-sample values),
  ``async/staleness_max``, ``async/mixed_version_share`` (share of samples whose tokens span several versions:
  partial rollouts) and ``async/trainer_version``.
"""

from __future__ import annotations

from typing import Any

ENGINE_VERSION_ATTR = "_openrlhf_search_weight_version"
"""Attribute of OpenRLHF's vLLM rollout actor holding the version of the weights it samples with."""
VERSION_MIN_KEY = "weight_version_min"
"""``extra_logs`` / ``experience.info`` key: the version at the start of a trajectory's first turn."""
VERSION_MAX_KEY = "weight_version_max"
"""``extra_logs`` / ``experience.info`` key: the version at the end of a trajectory's last turn."""
TRANSPORT_KEYS = (VERSION_MIN_KEY, VERSION_MAX_KEY)
STALENESS_KEY = "async/staleness"
"""Per-sample staleness written into ``experience.info`` (OpenRLHF logs its mean)."""


def set_engine_version(actor: Any, version: int) -> int:
    """Run inside a vLLM rollout actor (``actor.__ray_call__.remote(set_engine_version, v)``): record ``version``."""
    setattr(actor, ENGINE_VERSION_ATTR, int(version))
    return int(version)


def engine_version(engine: Any) -> int:
    """The weight version the rollout actor ``engine`` samples with (0 before any broadcast or without a trainer)."""
    return int(getattr(engine, ENGINE_VERSION_ATTR, 0))


def publish_engine_version(engines: list, version: int) -> None:
    """Set ``version`` on every vLLM rollout actor (Ray handles) and wait for all of them."""
    import ray

    ray.get([engine.__ray_call__.remote(set_engine_version, version) for engine in engines])


def trajectory_tags(turn_versions: list[tuple[int, int]]) -> dict[str, int]:
    """The ``extra_logs`` of one trajectory from its per-turn ``(version at start, version at end)``."""
    if not turn_versions:
        return {VERSION_MIN_KEY: 0, VERSION_MAX_KEY: 0}
    return {VERSION_MIN_KEY: min(s for s, _ in turn_versions), VERSION_MAX_KEY: max(e for _, e in turn_versions)}


def tag_staleness(experiences: list, trainer_version: int) -> dict[str, float]:
    """Per-sample staleness of OpenRLHF micro-batches, in place; returns the batch metrics.

    Each experience whose ``info`` carries :data:`VERSION_MIN_KEY`/:data:`VERSION_MAX_KEY` (``[b]``) gets
    ``info[STALENESS_KEY] = trainer_version - version_min``; the version keys are kept (the dumps read them).
    Returns ``{}`` when no experience carries versions (an agent that is not ours).
    """
    import torch

    stale, mixed = [], []
    for exp in experiences:
        lo, hi = exp.info.get(VERSION_MIN_KEY), exp.info.get(VERSION_MAX_KEY)
        if lo is None or hi is None:
            continue
        lo = torch.as_tensor(lo).reshape(-1).long()
        hi = torch.as_tensor(hi).reshape(-1).long()
        if (hi < lo).any() or (lo > trainer_version).any():
            raise RuntimeError(f"inconsistent weight versions: start {lo.tolist()}, end {hi.tolist()}, trainer "
                               f"version {trainer_version} (a sample newer than the trainer, or ending before it "
                               "started)")  # fmt: skip
        s = (trainer_version - lo).float()
        exp.info[STALENESS_KEY] = s
        stale.append(s)
        mixed.append((hi > lo).float())
    if not stale:
        return {}
    s, m = torch.cat(stale), torch.cat(mixed)
    return {"async/staleness_max": float(s.max()), "async/mixed_version_share": float(m.mean()),
            "async/trainer_version": float(trainer_version)}  # fmt: skip
