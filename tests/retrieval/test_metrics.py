"""Per-turn retrieval metrics from Trajectory / TurnRecord objects."""

from __future__ import annotations

from openrlhf_search.env.trajectory import Trajectory, TurnRecord
from openrlhf_search.retrieval.metrics import retrieval_metrics


def _traj(golds, turns):
    t = Trajectory(prompt_ids=[1], meta={"golden_answers": golds})
    for i, (action, queries, obs, error) in enumerate(turns):
        t.turns.append(TurnRecord(index=i, model_span=(0, 0), action=action, queries=queries, obs_text=obs,
                                  error=error))
    return t


def test_golden_in_topk_by_turn_repeats_and_latency():
    trajs = [
        _traj(["Paris"], [("search", ["capital of France"], "Doc 1(Title: Paris) Paris is the capital", None),
                          ("search", ["Capital of  france"], "Doc 1(Title: Lyon) a city", None),
                          ("answer", [], "", None)]),
        _traj(["Guido van Rossum"], [("search", ["python creator"], "created by Guido van Rossum.", None),
                                     ("search", ["ignored"], "", "search is not allowed on the last turn")]),
        _traj(["Paris"], [("search", ["q"], "Parisian food", None), ("invalid", [], "bad format", None)]),
    ]
    m = retrieval_metrics(trajs, retrieval_seconds=0.3, retrieval_calls=3)
    assert m["retrieval/searches_turn0"] == 3 and m["retrieval/searches_turn1"] == 1
    assert abs(m["retrieval/golden_in_topk_turn0"] - 2 / 3) < 1e-9  # "Parisian" is not the token "paris"
    assert m["retrieval/golden_in_topk_turn1"] == 0.0
    assert m["retrieval/golden_in_topk"] == 0.5
    assert m["retrieval/repeated_query_rate"] == 0.25  # "Capital of  france" repeats "capital of France"
    assert abs(m["retrieval/latency_ms"] - 100.0) < 1e-9
    assert retrieval_metrics([_traj(["x"], [("answer", [], "", None)])]) == {}
