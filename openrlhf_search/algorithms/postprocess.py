"""Advantage post-processors: what runs between the advantage estimator and the loss (CalibAdv is one).

A post-processor is registered in :data:`ADVANTAGE_POSTPROCESSORS` as a factory ``factory(**cfg) -> fn`` with::

    fn(advantages, action_mask, group_ids, records) -> (token_advantages[B, T], metrics: dict[str, float])

* ``advantages``: ``[B]`` outcome advantages from the estimator, or ``[B, T]`` token advantages from an earlier
  post-processor of the chain;
* ``action_mask``: ``[B, T]`` bool, True on model tokens (the response axis);
* ``group_ids``: ``[B]`` integer group ids;
* ``records``: ``B`` per-trajectory records the environment built (:class:`~.calibadv.CalibRecord`), or ``None``
  when the factory does not set ``needs_records = True`` (then the OpenRLHF agent does not publish them).

Every backend runs the same chain through :func:`apply_postprocessors`: the local trainer on its packed batch, the
OpenRLHF patch (:mod:`openrlhf_search.integrations.openrlhf.patches`) on OpenRLHF's experiences for both the DeepSpeed
and the Megatron actors. A user's post-processor registered in a module listed in the config's ``plugins:`` is
selected with ``algorithm.advantage_postprocessors: [name]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from openrlhf_search.registry import Registry

PostProcessorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, dict]]

ADVANTAGE_POSTPROCESSORS: Registry[Callable[..., PostProcessorFn]] = Registry("advantage post-processor")


def register_advantage_postprocessor(name: str, needs_records: bool = False):
    """Register ``factory(**cfg) -> fn(advantages, action_mask, group_ids, records) -> (token_adv, metrics)``.

    ``needs_records``: the chain needs the environment's per-trajectory records (CalibAdv's search turns).
    """

    def deco(factory):
        factory.needs_records = needs_records
        return ADVANTAGE_POSTPROCESSORS.register(name)(factory)

    return deco


def broadcast_advantages(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, T]`` on model tokens (0 elsewhere); ``[B, T]`` is masked and returned."""
    mask = action_mask.bool()
    adv = advantages.to(torch.float32)
    if adv.dim() == 1:
        adv = adv[:, None].expand(mask.shape)
    return torch.where(mask, adv, torch.zeros_like(adv))


def needs_records(chain: Sequence[tuple[str, dict]]) -> bool:
    """True if a post-processor of ``chain`` (``[(name, cfg)]``) needs the environment's records."""
    return any(getattr(ADVANTAGE_POSTPROCESSORS.get(name), "needs_records", False) for name, _ in chain)


def apply_postprocessors(chain: Sequence[tuple[str, dict]], advantages: torch.Tensor, action_mask: torch.Tensor,
                         group_ids: torch.Tensor, records: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Run ``chain`` (``[(name, cfg)]``, in order) on ``advantages``; return ``([B, T] advantages, metrics)``.

    With an empty chain the outcome advantages are broadcast onto the model tokens.
    """
    metrics: dict[str, float] = {}
    adv = advantages
    for name, cfg in chain:
        fn = ADVANTAGE_POSTPROCESSORS.get(name)(**(cfg or {}))
        adv, m = fn(adv, action_mask, group_ids, records)
        metrics.update({k: float(v) for k, v in m.items()})
    return broadcast_advantages(adv, action_mask), metrics


@register_advantage_postprocessor("calibadv", needs_records=True)
def _calibadv(**cfg) -> PostProcessorFn:
    """CalibAdv (arXiv 2604.18235, :func:`.calibadv.calibrate_advantages`); ``cfg``: ``CalibAdvConfig`` fields."""
    from .calibadv import CalibAdvConfig, calibrate_advantages

    config = CalibAdvConfig(**cfg)

    def fn(advantages, action_mask, group_ids, records):
        if advantages.dim() != 1:
            raise ValueError("calibadv needs outcome advantages [B]: list it first in "
                             "algorithm.advantage_postprocessors")
        if records is None:
            raise ValueError("calibadv needs the environment's CalibRecords")
        return calibrate_advantages(advantages, list(records), action_mask.cpu(), group_ids, config)

    return fn
