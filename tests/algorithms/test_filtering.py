import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_search.algorithms import BatchNotFilledError, GroupBatcher, mixed_outcome_groups


def test_mixed_outcome_groups_golden():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.4, 0.4, 0.7])
    g = torch.tensor([7, 7, 7, 3, 3, 9, 9, 100, 100, -1])
    assert mixed_outcome_groups(r, g).tolist() == [True] * 3 + [False] * 4 + [False, False, False]
    f1 = torch.tensor([0.5, 0.5000001, 0.2, 0.9])
    assert mixed_outcome_groups(f1, torch.tensor([0, 0, 1, 1])).tolist() == [False, False, True, True]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1)), min_size=1, max_size=40))
def test_mixed_outcome_groups_keeps_exactly_mixed_binary_groups(rows):
    gids = torch.tensor([g for g, _ in rows])
    r = torch.tensor([float(x) for _, x in rows])
    keep = mixed_outcome_groups(r, gids)
    for i, (gid, _) in enumerate(rows):
        group = [x for g, x in rows if g == gid]
        assert bool(keep[i]) == (0 < sum(group) < len(group))


def _round(groups):
    """groups: list of (gid, rewards) -> rewards, group_ids, items."""
    r, g, items = [], [], []
    for gid, rs in groups:
        for k, x in enumerate(rs):
            r.append(x)
            g.append(gid)
            items.append(f"{gid}:{k}")
    return torch.tensor(r), torch.tensor(g), items


def test_batcher_fills_across_rounds_and_reports():
    b = GroupBatcher(target_groups=3, max_rounds=5)
    b.add(*_round([(0, [1, 1]), (1, [0, 1]), (2, [0, 0])]))
    assert not b.done and b.report.kept_per_round == [1]
    b.add(*_round([(1, [1, 0]), (5, [1, 1]), (6, [0, 0])]))  # gid 1 again: a different prompt of round 2
    assert not b.done
    b.add(*_round([(8, [0, 1]), (9, [1, 0])]))
    assert b.done and b.full
    batch = b.result()
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.items == ["1:0", "1:1", "1:0", "1:1", "8:0", "8:1"]
    assert batch.sources == [(0, 1), (1, 1), (2, 8)]
    rep = batch.report
    assert rep.rounds == 3 and rep.kept_groups == 3 and rep.dropped_surplus == 1 and not rep.partial
    assert rep.keep_ratio_per_round == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert rep.as_metrics()["filter/partial"] == 0.0
    with pytest.raises(RuntimeError, match="done"):
        b.add(*_round([(0, [0, 1])]))


def test_batcher_cap_raises_with_report():
    b = GroupBatcher(target_groups=2, max_rounds=2)
    b.add(*_round([(0, [1, 1]), (1, [0, 1])]))
    with pytest.raises(BatchNotFilledError, match=r"1/2 mixed-outcome groups after 2 round\(s\)") as exc:
        b.add(*_round([(0, [0, 0])]))
    assert exc.value.report.partial and exc.value.report.keep_ratio_per_round == [0.5, 0.0]
    assert b.done  # no way to loop forever


def test_batcher_cap_partial_warns_and_flags():
    b = GroupBatcher(target_groups=4, max_rounds=1, on_cap="partial")
    with pytest.warns(RuntimeWarning, match="PARTIAL"):
        b.add(*_round([(0, [1, 0]), (1, [1, 1])]))
    batch = b.result()
    assert batch.report.partial and batch.report.as_metrics()["filter/partial"] == 1.0
    assert batch.rewards.tolist() == [1.0, 0.0]


def test_batcher_nothing_kept_is_an_error_even_when_partial_allowed():
    b = GroupBatcher(target_groups=1, max_rounds=1, on_cap="partial")
    with pytest.warns(RuntimeWarning):
        b.add(*_round([(0, [1, 1])]))
    with pytest.raises(BatchNotFilledError):
        b.result()


def test_batcher_argument_errors():
    with pytest.raises(ValueError, match="target_groups"):
        GroupBatcher(0)
    with pytest.raises(ValueError, match="on_cap"):
        GroupBatcher(1, on_cap="ignore")
    b = GroupBatcher(1)
    with pytest.raises(RuntimeError, match="before the batch is done"):
        b.result()
    with pytest.raises(ValueError, match="items"):
        b.add(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), ["only one"])
