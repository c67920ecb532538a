"""CalibAdv: token-level calibration of GRPO advantages for search agents.

Paper: "Negative Advantage Is a Double-Edged Sword: Calibrating Advantage in GRPO for Deep Search"
(arXiv 2604.18235; reference code github.com/wujwyi/CalibAdv, read for the details below, not copied).

Problem: with outcome rewards, a failed trajectory's negative advantage also punishes its *good* searches -- turns
that retrieved exactly the documents a successful sibling used -- and negative answer tokens outweigh positive
ones, which collapses entropy. CalibAdv fixes both, per group of G rollouts of one question:

1. **Search calibration ("soft penalty").** Silver docs of a group = the doc ids retrieved by the rollouts that
   have a valid format and reach the group's maximum F1, provided that maximum is ``>= silver_f1_threshold``
   (0.7). For every *negative*-advantage, valid-format rollout, search turn ``k`` gets the score
   ``s_k = |new silver docs of turn k| / |docs of turn k|`` where "new" means not retrieved by an earlier turn of
   the same rollout; ``s_k = 0`` if the turn repeats itself (``SearchTurn.repeated``: the environment flags a turn
   whose reasoning repeats an earlier one) or shares more than ``max_shared_docs`` docs with an earlier single
   turn (the reference code's repeat rule). The turn's tokens then get ``A * (1 - s_k)`` instead of ``A``.
   With ``aggressive_soft_penalty`` any turn with ``s_k >= aggressive_threshold`` (1/3 in the reference code) gets
   0, i.e. a search that found a third of its docs in the silver set is not punished at all.
2. **Answer rebalance.** Over the *answer* tokens of the group, let ``P`` be the sum of positive token advantages
   and ``N`` the absolute sum of negative ones. Positive answer advantages are scaled by ``N / (P * lambda)``
   (``lambda = target_ratio``, 1 by default) so that positive and negative answer tokens carry equal mass. If
   ``P == 0`` or ``N == 0`` the group's answer advantages are set to 0 (as the reference code does: a one-sided
   group cannot be rebalanced).

Tokens of a rollout that are neither in a search turn nor in the answer span keep ``A``; tokens outside the
action mask (prompt, retrieved passages, padding) are 0. The search calibration runs first, then the rebalance
(the order of the reference training script). Turning both switches off returns ``A`` broadcast on model tokens.

Spans index the response axis ``T`` of ``action_mask`` (``start`` inclusive, ``end`` exclusive). Per the reference
code the answer span is the final model segment (reasoning before ``<answer>`` included) and a search turn is the
model segment that issued the query; the environment builds both (``Trajectory.to_calib_record()``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class SearchTurn:
    """One search action of a trajectory."""

    start: int
    """First token (inclusive) of the model segment that issued the search, on the response axis."""
    end: int
    """End token (exclusive) of that segment."""
    doc_ids: list[str] = field(default_factory=list)
    """Ids of the documents the retriever returned for this turn, in rank order."""
    repeated: bool = False
    """True if the environment judged the turn a repeat of an earlier one (same query / near-identical thought)."""


@dataclass
class CalibRecord:
    """What CalibAdv needs to know about one trajectory."""

    search_turns: list[SearchTurn]
    """The trajectory's search turns, in order."""
    answer_span: tuple[int, int] | None
    """``(start, end)`` of the final answer segment on the response axis, or None if the model never answered."""
    f1: float
    """Answer F1 against the golden answers (the silver-doc criterion)."""
    valid_format: bool
    """True if the trajectory followed the tag format (only those define silver docs or get calibrated)."""


@dataclass
class CalibAdvConfig:
    """Switches and constants of CalibAdv (defaults follow the paper's main setting)."""

    silver_f1_threshold: float = 0.7
    """A group has silver docs only if its best valid rollout reaches at least this F1."""
    target_ratio: float = 1.0
    """``lambda`` of the answer rebalance: positive answer mass is scaled to ``N / lambda``."""
    aggressive_soft_penalty: bool = False
    """Zero (instead of scale) the advantage of negative turns whose silver score is >= ``aggressive_threshold``."""
    aggressive_threshold: float = 1.0 / 3.0
    """Silver score above which the aggressive soft penalty zeroes a turn (1/3 in the reference code)."""
    max_shared_docs: int = 1
    """A turn sharing more than this many docs with any single earlier turn counts as repeated (score 0)."""
    enable_search_calibration: bool = True
    """Apply step 1 (soft penalty on search turns of negative rollouts)."""
    enable_answer_rebalance: bool = True
    """Apply step 2 (per-group rebalance of answer-token advantages)."""
    f1_tie_tol: float = 1e-6
    """Rollouts within this of the group's max F1 all contribute silver docs."""

    def __post_init__(self) -> None:
        if not self.target_ratio > 0:
            raise ValueError(f"CalibAdvConfig.target_ratio must be > 0, got {self.target_ratio}")
        if self.max_shared_docs < 0:
            raise ValueError(f"CalibAdvConfig.max_shared_docs must be >= 0, got {self.max_shared_docs}")


def _check_span(span: tuple[int, int], T: int, where: str) -> tuple[int, int]:
    start, end = int(span[0]), int(span[1])
    if not 0 <= start <= end <= T:
        raise ValueError(f"{where}: span ({start}, {end}) is outside the response axis [0, {T}]")
    return start, end


def silver_docs(records: list[CalibRecord], rows: list[int], cfg: CalibAdvConfig) -> set[str]:
    """Silver doc ids of one group (``rows`` index ``records``): docs of the valid rollouts at max F1 >= threshold."""
    valid = [i for i in rows if records[i].valid_format]
    if not valid:
        return set()
    best = max(records[i].f1 for i in valid)
    if best < cfg.silver_f1_threshold:
        return set()
    return {
        d
        for i in valid
        if records[i].f1 >= best - cfg.f1_tie_tol
        for turn in records[i].search_turns
        for d in turn.doc_ids
    }


def turn_scores(record: CalibRecord, silver: set[str], cfg: CalibAdvConfig) -> list[float]:
    """Silver score ``s_k`` in [0, 1] of each search turn of one rollout (0 for repeats and empty turns)."""
    seen: set[str] = set()
    earlier: list[set[str]] = []
    scores = []
    for turn in record.search_turns:
        docs = list(turn.doc_ids)
        uniq = set(docs)
        new_silver = {d for d in uniq if d in silver and d not in seen}
        score = len(new_silver) / len(docs) if docs else 0.0
        if turn.repeated or any(len(uniq & prev) > cfg.max_shared_docs for prev in earlier):
            score = 0.0
        scores.append(score)
        seen |= uniq
        earlier.append(uniq)
    return scores


def calibrate_advantages(
    seq_adv: torch.Tensor,
    records: list[CalibRecord],
    action_mask: torch.Tensor,
    group_ids: torch.Tensor,
    cfg: CalibAdvConfig | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Turn per-trajectory advantages into CalibAdv token advantages.

    Args:
        seq_adv: ``[B]`` outcome advantages (e.g. GRPO's).
        records: ``B`` :class:`CalibRecord` (spans on the response axis of ``action_mask``).
        action_mask: ``[B, T]`` True on model tokens.
        group_ids: ``[B]`` integer group ids.
        cfg: :class:`CalibAdvConfig` (defaults if None).
    Returns:
        ``(token_adv[B, T], metrics)``; token_adv is 0 outside the action mask. Metrics (floats, prefix
        ``calibadv/``): groups with silver docs, negative turns softened / zeroed, mean silver score of softened
        turns, mean positive-answer scale, groups whose answer advantages were zeroed.
    """
    cfg = cfg or CalibAdvConfig()
    if seq_adv.dim() != 1 or action_mask.dim() != 2 or action_mask.shape[0] != seq_adv.shape[0]:
        raise ValueError(f"seq_adv must be [B] and action_mask [B, T]; got {tuple(seq_adv.shape)}, "
                         f"{tuple(action_mask.shape)}")  # fmt: skip
    B, T = action_mask.shape
    if len(records) != B:
        raise ValueError(f"calibrate_advantages: {len(records)} records for a batch of {B}")
    if torch.as_tensor(group_ids).shape != (B,):
        raise ValueError(f"group_ids must be [B]={B}, got {tuple(torch.as_tensor(group_ids).shape)}")
    mask = action_mask.bool()
    adv = seq_adv.detach().to(torch.float32)
    token_adv = torch.where(mask, adv[:, None].expand(B, T), torch.zeros(B, T, dtype=adv.dtype, device=adv.device))

    groups: dict[int, list[int]] = defaultdict(list)
    for row, gid in enumerate(torch.as_tensor(group_ids).tolist()):
        groups[gid].append(row)

    n_silver_groups = n_neg_turns = n_soft = n_zeroed_turns = 0
    soft_scores: list[float] = []
    scales: list[float] = []
    zeroed_groups = 0
    for rows in groups.values():
        if cfg.enable_search_calibration:
            silver = silver_docs(records, rows, cfg)
            n_silver_groups += bool(silver)
            for i in rows:
                rec = records[i]
                if not (float(adv[i]) < 0 and rec.valid_format):
                    continue
                scores = turn_scores(rec, silver, cfg) if silver else [0.0] * len(rec.search_turns)
                for k, (turn, s) in enumerate(zip(rec.search_turns, scores)):
                    n_neg_turns += 1
                    if s <= 0:
                        continue
                    start, end = _check_span((turn.start, turn.end), T, f"records[{i}].search_turns[{k}]")
                    if cfg.aggressive_soft_penalty and s >= cfg.aggressive_threshold:
                        factor = 0.0
                        n_zeroed_turns += 1
                    else:
                        factor = 1.0 - s
                    n_soft += 1
                    soft_scores.append(s)
                    seg = token_adv[i, start:end]
                    token_adv[i, start:end] = torch.where(mask[i, start:end], adv[i] * factor, seg)
        if cfg.enable_answer_rebalance:
            idx = torch.tensor(rows, device=mask.device)
            ans = torch.zeros(len(rows), T, dtype=torch.bool, device=mask.device)
            for k, i in enumerate(rows):
                span = records[i].answer_span
                if span is not None:
                    start, end = _check_span(span, T, f"records[{i}].answer_span")
                    ans[k, start:end] = mask[i, start:end]
            if not ans.any():
                continue
            sub = token_adv[idx]
            vals = sub[ans]
            pos = vals.clamp(min=0).sum()
            neg = (-vals).clamp(min=0).sum()
            if pos > 0 and neg > 0:
                scale = neg / (pos * cfg.target_ratio)
                scales.append(float(scale))
                token_adv[idx] = torch.where(ans & (sub > 0), sub * scale, sub)
            elif pos > 0 or neg > 0:
                zeroed_groups += 1
                token_adv[idx] = torch.where(ans, torch.zeros_like(sub), sub)

    metrics = {
        "calibadv/silver_groups": float(n_silver_groups),
        "calibadv/negative_turns": float(n_neg_turns),
        "calibadv/softened_turns": float(n_soft),
        "calibadv/softened_turn_share": n_soft / n_neg_turns if n_neg_turns else 0.0,
        "calibadv/zeroed_turns": float(n_zeroed_turns),
        "calibadv/mean_silver_score": sum(soft_scores) / len(soft_scores) if soft_scores else 0.0,
        "calibadv/answer_pos_scale": sum(scales) / len(scales) if scales else 1.0,
        "calibadv/answer_zeroed_groups": float(zeroed_groups),
    }
    return token_adv.to(seq_adv.dtype if seq_adv.is_floating_point() else torch.float32), metrics
