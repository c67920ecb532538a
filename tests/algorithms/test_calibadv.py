import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_search.algorithms import CalibAdvConfig, CalibRecord, SearchTurn, calibrate_advantages

# Layout of every response (T=12): turn 0 model tokens 0-2, retrieved token 3, turn 1 model tokens 4-5,
# retrieved tokens 6-7, answer 8-11.
T = 12
MASK = torch.ones(4, T, dtype=torch.bool)
MASK[:, 3] = False
MASK[:, 6:8] = False
ADV = torch.tensor([1.5, -0.5, -0.5, -0.5])
GIDS = torch.tensor([7, 7, 7, 7])


def records(answer3=None):
    return [
        CalibRecord([SearchTurn(0, 3, ["d1", "d2"]), SearchTurn(4, 6, ["d3", "d4"])], (8, 12), 1.0, True),
        # turn 0: 1 of 2 docs silver -> s=.5; turn 1: d2 new silver, d1 already seen -> s=.5 (shares 1 doc: ok)
        CalibRecord([SearchTurn(0, 3, ["d1", "x1"]), SearchTurn(4, 6, ["d2", "d1"])], (8, 12), 0.0, True),
        # turn 0: all silver -> s=1 -> 0; turn 1 shares 2 docs with turn 0 -> repeat -> keeps A
        CalibRecord([SearchTurn(0, 3, ["d1", "d2"]), SearchTurn(4, 6, ["d1", "d2"])], (8, 12), 0.0, True),
        # invalid format: never calibrated
        CalibRecord([SearchTurn(0, 3, ["d1", "d2"])], answer3, 0.0, False),
    ]


def row(turn0, turn1, ans):
    r = torch.tensor([turn0] * 3 + [0.0] + [turn1] * 2 + [0.0, 0.0] + [ans] * 4)
    return r


def test_golden_soft_penalty_and_rebalance():
    adv, m = calibrate_advantages(ADV, records(), MASK, GIDS, CalibAdvConfig())
    # answer tokens: P = 4 * 1.5 = 6, N = 2 * 4 * .5 = 4 (row 3 has no answer span) -> positives * 4/6
    expected = torch.stack(
        [row(1.5, 1.5, 1.0), row(-0.25, -0.25, -0.5), row(0.0, -0.5, -0.5), row(-0.5, -0.5, -0.5)]
    )
    torch.testing.assert_close(adv, expected)
    assert m["calibadv/silver_groups"] == 1 and m["calibadv/softened_turns"] == 3
    assert m["calibadv/negative_turns"] == 4
    assert m["calibadv/answer_pos_scale"] == pytest.approx(4 / 6)


def test_target_ratio_lambda():
    adv, _ = calibrate_advantages(ADV, records(answer3=(8, 12)), MASK, GIDS, CalibAdvConfig(target_ratio=2.0))
    assert adv[0, 8:].tolist() == pytest.approx([1.5 * 6 / (6 * 2)] * 4)  # N = 6, P = 6, lambda = 2


def test_aggressive_soft_penalty_zeroes_good_turns():
    cfg = CalibAdvConfig(aggressive_soft_penalty=True, enable_answer_rebalance=False)
    adv, m = calibrate_advantages(ADV, records(), MASK, GIDS, cfg)
    torch.testing.assert_close(adv[1], row(0.0, 0.0, -0.5))  # s=.5 >= 1/3 -> 0
    assert m["calibadv/zeroed_turns"] == 3


def test_repeated_flag_scores_zero():
    recs = records()
    recs[1].search_turns[0].repeated = True
    adv, _ = calibrate_advantages(ADV, recs, MASK, GIDS, CalibAdvConfig(enable_answer_rebalance=False))
    # turn 0 flagged: keeps A; turn 1 now sees d2 new silver (d1 seen), s=.5
    torch.testing.assert_close(adv[1], row(-0.5, -0.25, -0.5))


def test_switches_off_is_identity_on_model_tokens():
    cfg = CalibAdvConfig(enable_search_calibration=False, enable_answer_rebalance=False)
    adv, _ = calibrate_advantages(ADV, records(), MASK, GIDS, cfg)
    torch.testing.assert_close(adv, torch.where(MASK, ADV[:, None].expand(4, T), torch.zeros(4, T)))


def test_no_silver_below_threshold_and_groups_are_separate():
    recs = records()
    recs[0].f1 = 0.6  # best F1 below 0.7 -> no silver docs in this group
    adv, m = calibrate_advantages(ADV, recs, MASK, GIDS, CalibAdvConfig(enable_answer_rebalance=False))
    torch.testing.assert_close(adv, torch.where(MASK, ADV[:, None].expand(4, T), torch.zeros(4, T)))
    assert m["calibadv/silver_groups"] == 0
    # silver docs of group 7 must not calibrate a rollout of another group
    gids = torch.tensor([7, 7, 7, 8])
    recs = records()
    adv, _ = calibrate_advantages(ADV, recs, MASK, gids, CalibAdvConfig(enable_answer_rebalance=False))
    recs[3].valid_format = True
    adv2, _ = calibrate_advantages(ADV, recs, MASK, gids, CalibAdvConfig(enable_answer_rebalance=False))
    torch.testing.assert_close(adv2[3], adv[3])


def test_one_sided_group_answers_zeroed():
    adv_in = torch.tensor([-0.5, -0.5, 0.0, 0.0])
    adv, m = calibrate_advantages(adv_in, records(), MASK, GIDS, CalibAdvConfig(enable_search_calibration=False))
    assert torch.all(adv[:, 8:] == 0) and m["calibadv/answer_zeroed_groups"] == 1
    assert torch.all(adv[0, :3] == -0.5)  # non-answer tokens untouched


def test_bad_spans_are_named():
    recs = records()
    recs[1].search_turns[1] = SearchTurn(4, 40, ["d2"])
    with pytest.raises(ValueError, match=r"records\[1\]\.search_turns\[1\]"):
        calibrate_advantages(ADV, recs, MASK, GIDS)
    with pytest.raises(ValueError, match="4 records"):
        calibrate_advantages(ADV[:3], records(), MASK[:3], GIDS[:3])


@st.composite
def groups(draw):
    G = draw(st.integers(2, 6))
    recs, adv = [], []
    for _ in range(G):
        turns = []
        for k in range(draw(st.integers(0, 2))):
            docs = draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=3))
            turns.append(SearchTurn(3 * k, 3 * k + 2, docs, draw(st.booleans())))
        ans = (8, 12) if draw(st.booleans()) else None
        recs.append(CalibRecord(turns, ans, draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])), draw(st.booleans())))
        adv.append(draw(st.floats(-2, 2, allow_nan=False, width=32)))
    return recs, torch.tensor(adv)


@settings(max_examples=40, deadline=None)
@given(groups(), st.booleans(), st.floats(0.5, 2.0))
def test_properties(data, aggressive, lam):
    recs, adv = data
    B = len(recs)
    mask = torch.ones(B, T, dtype=torch.bool)
    gids = torch.zeros(B, dtype=torch.long)
    cfg = CalibAdvConfig(aggressive_soft_penalty=aggressive, target_ratio=lam)
    out, _ = calibrate_advantages(adv, recs, mask, gids, cfg)
    assert torch.isfinite(out).all()
    ans = torch.zeros(B, T, dtype=torch.bool)
    for i, r in enumerate(recs):
        if r.answer_span:
            ans[i, 8:12] = True
        for t in r.search_turns:  # search turns never get a larger or sign-flipped advantage
            seg = out[i, t.start : t.end]
            assert torch.all(seg * adv[i] >= 0) and torch.all(seg.abs() <= abs(adv[i]) + 1e-6)
            if adv[i] >= 0 or not r.valid_format:
                assert torch.all(seg == adv[i])
    a = out[ans]
    pos, neg = a.clamp(min=0).sum().item(), (-a).clamp(min=0).sum().item()
    assert (pos == 0 and neg == 0) or pos == pytest.approx(neg / lam, rel=1e-4)
