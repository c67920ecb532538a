"""Stability diagnostics of a policy-gradient update, returned as metrics by every policy loss.

All statistics are computed without gradient over *model tokens only* (``action_mask``), and returned as plain
Python floats so that any logger can take them. Keys (prefix ``actor/`` is left to the caller):

* ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``ratio_p01``, ``ratio_p50``, ``ratio_p99`` -- the importance
  ratio used by the loss (per token, or the sequence ratio ``s_i`` broadcast to its tokens for GSPO/DSPO).
  Quantiles are taken over at most ``max_quantile_elems`` tokens (a deterministic strided subsample beyond that,
  because ``torch.quantile`` refuses inputs above 16M elements).
* ``clip_frac_low`` -- share of model tokens with ``A < 0`` and ``ratio < 1 - clip_low`` (the clip zeroes their
  gradient); ``clip_frac_high`` -- ``A > 0`` and ``ratio > 1 + clip_high``; ``clip_frac_dual`` -- ``A < 0`` and
  ``ratio > dual_clip`` (0 when dual-clip is off).
* ``drift_share`` -- share of *positive-advantage* model tokens whose ratio fell to ``<= drift_threshold`` (the SAPO
  threshold): the signature of importance-sampling distribution drift that SAPO (arXiv 2603.10069) penalises. PPO
  keeps pushing these tokens up only through a vanishing ratio-weighted gradient.
* ``approx_kl_old`` -- mean k3 estimate of KL(pi_old || pi_theta) on the rollout tokens;
  ``approx_kl_ref`` -- mean k3 estimate of KL(pi_theta || pi_ref) when reference log-probs are given.
* ``entropy`` -- masked mean token entropy when given.
* ``model_tokens`` -- number of model tokens in the micro-batch.
"""

from __future__ import annotations

import torch

from .kl import kl_penalty, masked_mean


@torch.no_grad()
def ratio_quantiles(values: torch.Tensor, qs=(0.01, 0.5, 0.99), max_quantile_elems: int = 1 << 22) -> list[float]:
    """Quantiles of a 1-D tensor (``nan`` when empty), subsampling with a fixed stride above the size limit."""
    if values.numel() == 0:
        return [float("nan")] * len(qs)
    values = values.float()
    if values.numel() > max_quantile_elems:
        stride = -(-values.numel() // max_quantile_elems)
        values = values[::stride]
    return torch.quantile(values, torch.tensor(qs, dtype=values.dtype, device=values.device)).tolist()


@torch.no_grad()
def policy_diagnostics(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    drift_threshold: float = 0.5,
    token_ratio: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> dict[str, float]:
    """Compute the diagnostics listed in the module docstring.

    Args:
        ratio: ``[B, T]`` ratio the loss used (token or sequence-broadcast); values at masked positions ignored.
        advantages: ``[B, T]`` per-token advantages.
        action_mask: ``[B, T]`` bool, True on model tokens.
        log_probs, old_log_probs: ``[B, T]`` current and rollout log-probs.
        clip_low, clip_high, dual_clip: the loss's clip settings.
        drift_threshold: ratio at or below which a positive-advantage token counts as drifted (SAPO's ``t``).
        token_ratio: ``[B, T]`` per-token ratio for the drift share (defaults to ``ratio``; differs for GSPO).
        ref_log_probs: optional ``[B, T]`` reference log-probs.
        entropy: optional ``[B, T]`` token entropies.
    """
    mask = action_mask.bool()
    n = int(mask.sum().item())
    r = ratio.detach()[mask].double()
    a = advantages.detach()[mask].float()
    out: dict[str, float] = {"model_tokens": float(n)}
    if n:
        p01, p50, p99 = ratio_quantiles(r)
        out.update(
            ratio_mean=r.mean().item(),
            ratio_min=r.min().item(),
            ratio_max=r.max().item(),
            ratio_p01=p01,
            ratio_p50=p50,
            ratio_p99=p99,
            clip_frac_low=((a < 0) & (r < 1 - clip_low)).float().mean().item(),
            clip_frac_high=((a > 0) & (r > 1 + clip_high)).float().mean().item(),
            clip_frac_dual=((a < 0) & (r > dual_clip)).float().mean().item() if dual_clip is not None else 0.0,
        )
        pos = a > 0
        tr = r if token_ratio is None else token_ratio.detach()[mask].float()
        out["drift_share"] = ((tr <= drift_threshold) & pos).float().sum().item() / max(int(pos.sum().item()), 1)
    else:
        nan = float("nan")
        out.update(
            ratio_mean=nan, ratio_min=nan, ratio_max=nan, ratio_p01=nan, ratio_p50=nan, ratio_p99=nan,
            clip_frac_low=0.0, clip_frac_high=0.0, clip_frac_dual=0.0, drift_share=0.0,
        )  # fmt: skip
    out["approx_kl_old"] = masked_mean(kl_penalty(old_log_probs.detach(), log_probs.detach(), mask, "k3"), mask).item()
    if ref_log_probs is not None:
        kl_ref = kl_penalty(log_probs.detach(), ref_log_probs.detach(), mask, "k3")
        out["approx_kl_ref"] = masked_mean(kl_ref, mask).item()
    if entropy is not None:
        out["entropy"] = masked_mean(entropy.detach().float(), mask).item()
    return out
