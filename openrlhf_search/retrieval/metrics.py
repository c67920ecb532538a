"""Per-turn retrieval metrics of a batch of trajectories (the trainer logs them to ``metrics.jsonl``).

Computed from the :class:`~openrlhf_search.env.trajectory.Trajectory` / ``TurnRecord`` objects alone, so every
backend that produces trajectories can log the same figures:

* ``retrieval/golden_in_topk`` and ``retrieval/golden_in_topk_turn{t}``: the share of searches (turns whose queries
  reached the retriever) whose observation -- the top-k passages as shown to the model, after the observation
  budget's truncation -- contains a golden answer (SQuAD-normalised, token-aligned substring, the rule of
  :func:`openrlhf_search.rewards.substring_exact_match`); ``t`` is the 0-based turn;
* ``retrieval/searches_turn{t}``: the number of such searches at turn ``t`` (the denominator);
* ``retrieval/repeated_query_rate``: the share of queries equal (normalised) to an earlier query of the same
  trajectory -- a policy that re-asks the same thing wastes turns;
* ``retrieval/latency_ms``: mean wall time of one retriever call in the step (from the caller's timer).

And, for an HTTP retriever (one server or several replicas), from its counters (:func:`replica_metrics`):

* ``retrieval/failover``: requests of the step that a replica answered after another one had failed them (a dead
  or hung replica; the batch was answered in full, nothing lost);
* ``retrieval/replica_errors``: failed attempts in the step (connection errors, timeouts, 5xx);
* ``retrieval/replicas_up``: replicas the client considers up at the end of the step (of ``retrieval/replicas``).
"""

from __future__ import annotations

from collections.abc import Sequence

from openrlhf_search.env.protocol import substring_exact_match


def replica_stats(retriever) -> dict | None:
    """The replica counters (``HTTPRetriever.replica_stats()``) of ``retriever`` or of the retriever it wraps
    (``.inner``: timers, caches), or ``None`` when it is not an HTTP client."""
    seen = 0
    while retriever is not None and seen < 8:
        stats = getattr(type(retriever), "replica_stats", None)
        if callable(stats):
            return retriever.replica_stats()
        retriever, seen = getattr(retriever, "inner", None), seen + 1
    return None


def replica_metrics(before: dict | None, after: dict | None) -> dict[str, float]:
    """The step's ``retrieval/failover``, ``retrieval/replica_errors`` (differences of two :func:`replica_stats`
    snapshots), ``retrieval/replicas_up`` and ``retrieval/replicas``; ``{}`` without an HTTP retriever."""
    if not after:
        return {}
    before = before or {}
    return {"retrieval/failover": float(after["failovers"] - before.get("failovers", 0)),
            "retrieval/replica_errors": float(after["replica_errors"] - before.get("replica_errors", 0)),
            "retrieval/replicas_up": float(after["replicas_up"]), "retrieval/replicas": float(after["replicas"])}


def retrieval_metrics(trajs: Sequence, retrieval_seconds: float | None = None,
                      retrieval_calls: int | None = None) -> dict[str, float]:
    """The metrics of the module docstring for ``trajs``; latency only when seconds and calls are given."""
    by_turn: dict[int, list[int]] = {}
    queries = repeated = 0
    for traj in trajs:
        golds = traj.meta.get("golden_answers") or []
        golds = [golds] if isinstance(golds, str) else [str(g) for g in golds]
        seen: set[str] = set()
        for turn in traj.turns:
            if turn.action != "search" or not turn.queries or turn.error is not None:
                continue
            by_turn.setdefault(turn.index, []).append(int(substring_exact_match(turn.obs_text, golds) > 0))
            for q in turn.queries:
                key = " ".join(q.lower().split())
                queries += 1
                repeated += key in seen
                seen.add(key)
    out: dict[str, float] = {}
    all_hits = [h for hits in by_turn.values() for h in hits]
    if all_hits:
        out["retrieval/golden_in_topk"] = sum(all_hits) / len(all_hits)
    for t in sorted(by_turn):
        out[f"retrieval/golden_in_topk_turn{t}"] = sum(by_turn[t]) / len(by_turn[t])
        out[f"retrieval/searches_turn{t}"] = float(len(by_turn[t]))
    if queries:
        out["retrieval/repeated_query_rate"] = repeated / queries
    if retrieval_seconds is not None and retrieval_calls:
        out["retrieval/latency_ms"] = 1000.0 * retrieval_seconds / retrieval_calls
    return out
