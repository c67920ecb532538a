"""Rollout records: the per-trajectory JSON lines the trajectory viewer reads.

One record per trajectory, written to ``<run_dir>/rollouts/step_XXXXXX.jsonl`` by the local trainer (every
``logging.rollout_every`` steps) and by the OpenRLHF search agent (``<dir>/rollouts/agent_<pid>.jsonl``, one line per
finished episode). The same :func:`trajectory_record` builds both, so the viewer never has to know which backend
wrote a run. Fields (all optional except ``question``, ``turns`` and ``tokens``)::

    {"step": 3, "group": "q17", "index": 0, "question": "...", "golden_answers": ["..."],
     "answer": "...", "finish_reason": "answer", "reward": 0.8, "reward_info": {"f1": 0.8, ...},
     "turns": [{"action": "search", "text": "...", "queries": ["..."], "doc_ids": ["..."], "obs_text": "..."}],
     "tokens": ["<search>", " who", ...],          # response tokens, decoded one by one
     "mask": [1, 1, 0, ...],                      # 1 = model token (in the loss), 0 = retrieved/feedback
     "adv": [0.5, ...],                           # per-token advantage after post-processing (CalibAdv)
     "ratio": [1.01, ...],                        # pi_theta / pi_old after the step's update (model tokens)
     "version": [3, ...]}                          # policy version that sampled each token (asynchronous runs)

Per-token lists are rounded (4 significant digits) to keep files small.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["trajectory_record", "write_records", "read_records", "ROLLOUTS_DIR"]

ROLLOUTS_DIR = "rollouts"
"""Sub-directory of a run directory holding rollout records."""


def _round(xs: Sequence[float] | None) -> list[float] | None:
    if xs is None:
        return None
    out = []
    for x in xs:
        x = float(x)
        out.append(round(x, 4) if math.isfinite(x) else None)
    return out


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Decode ``ids`` one token at a time (what the token view shows); byte-level pieces are kept as decoded."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def trajectory_record(traj, tokenizer, *, step: int | None = None, reward: float | None = None,
                      reward_info: dict | None = None, advantages: Sequence[float] | None = None,
                      ratios: Sequence[float] | None = None, versions: Sequence[int] | None = None) -> dict[str, Any]:
    """A JSON-serialisable record of one :class:`~openrlhf_search.env.trajectory.Trajectory`.

    Args:
        traj: the trajectory (``response_ids``, ``action_mask``, ``turns``, ``answer``, ``finish_reason``, ``meta``).
        tokenizer: decodes the response tokens one by one.
        step: the RL step that produced it.
        reward, reward_info: the scalar reward and its parts (the reward function's info dict).
        advantages: per-response-token advantages (length ``len(traj.response_ids)``), after post-processing.
        ratios: per-response-token importance ratios ``pi_theta / pi_old`` (model tokens; others ignored).
        versions: per-response-token policy versions (asynchronous runs).
    """
    meta = getattr(traj, "meta", {}) or {}
    n = len(traj.response_ids)
    turns = []
    for t in traj.turns:
        turns.append({
            "action": t.action, "text": t.text, "queries": list(t.queries), "doc_ids": list(t.doc_ids),
            "obs_text": t.obs_text, "error": t.error, "repeated": bool(t.repeated),
        })
    rec: dict[str, Any] = {
        "step": step,
        "group": str(meta.get("group_id", "")),
        "index": meta.get("rollout_index"),
        "question": meta.get("question", ""),
        "golden_answers": list(meta.get("golden_answers", [])),
        "answer": traj.answer,
        "finish_reason": traj.finish_reason,
        "reward": None if reward is None else round(float(reward), 4),
        "reward_info": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in (reward_info or {}).items()
                        if isinstance(v, (int, float, str, bool)) or v is None},
        "num_searches": traj.num_searches,
        "turns": turns,
        "tokens": token_pieces(tokenizer, traj.response_ids),
        "mask": [int(m) for m in traj.action_mask],
    }
    for key, values in (("adv", advantages), ("ratio", ratios)):
        if values is not None:
            rec[key] = _round(list(values)[:n])
    if versions is not None:
        rec["version"] = [int(v) for v in list(versions)[:n]]
    return rec


def write_records(path: str | Path, records: Sequence[dict]) -> Path:
    """Append ``records`` as JSON lines to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def read_records(path: str | Path) -> list[dict]:
    """Read a rollout-record file; a torn last line (a crash mid-write) is skipped, any other bad line named."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines):  # torn last line
                break
            raise ValueError(f"{path}:{i}: not a JSON rollout record ({exc.msg})") from None
    return out
