import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_search.algorithms import get_advantage_estimator

R = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.2, 7.0])
G = torch.tensor([10, 10, 10, -3, -3, 42])  # non-contiguous ids, a singleton group


def test_grpo_golden_unbiased():
    adv = get_advantage_estimator("grpo")(R, G)
    # group {1,0,0}: mean 1/3, unbiased std sqrt(1/3); group {0.5,0.2}: mean .35, std .15*sqrt(2); singleton -> 0
    s = math.sqrt(1 / 3)
    expected = torch.tensor([(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 1 / math.sqrt(2), -1 / math.sqrt(2), 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_grpo_golden_population_std():
    adv = get_advantage_estimator("grpo", unbiased=False)(R, G)
    s = math.sqrt(2 / 9)
    torch.testing.assert_close(adv[:3], torch.tensor([(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s]), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv[3:5], torch.tensor([1.0, -1.0]), atol=1e-4, rtol=0)


def test_dr_grpo_golden():
    adv = get_advantage_estimator("dr_grpo")(R, G)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.15, -0.15, 0.0]), atol=1e-6, rtol=0)


def test_rloo_golden():
    adv = get_advantage_estimator("rloo")(R, G)
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5, 0.3, -0.3, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_degenerate_groups_zero_no_nan(name):
    fn = get_advantage_estimator(name)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 2])
    adv = fn(rewards, groups)
    assert torch.equal(adv, torch.zeros(5))
    assert fn(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value", [0.1, 0.7, 1 / 3])
@pytest.mark.parametrize("size", [7, 16])
def test_equal_non_binary_rewards_give_exactly_zero(name, value, size):
    # float32 F1 rewards: the group mean of 16 x 0.7 is off by an ulp in float32, and GRPO's /(std + eps) used to
    # turn that residue into advantages of ~0.1 with arbitrary signs for an all-equal (signal-free) group
    rewards = torch.cat([torch.full((size,), value), torch.tensor([0.0, 1.0])])
    groups = torch.tensor([5] * size + [9, 9])
    adv = get_advantage_estimator(name)(rewards, groups)
    assert adv.dtype == torch.float32
    assert torch.equal(adv[:size], torch.zeros(size))
    assert adv[-1] > 0 > adv[-2]


def test_eps_is_configurable():
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    adv = get_advantage_estimator("grpo", eps=1.0)(r, g)  # std = sqrt(.5)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1.0))


def test_input_errors_are_clear():
    fn = get_advantage_estimator("grpo")
    with pytest.raises(ValueError, match="same length"):
        fn(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        fn(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([float("nan"), 0.0]), torch.zeros(2, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=2, max_size=16).filter(
        lambda xs: max(xs) - min(xs) > 1e-3
    ),
    st.integers(-1000, 1000),
)
def test_grpo_nondegenerate_group_zero_mean_unit_std(rewards, gid):
    r = torch.tensor(rewards)
    adv = get_advantage_estimator("grpo")(r, torch.full((len(rewards),), gid))
    assert abs(adv.mean().item()) < 1e-5
    assert abs(adv.std().item() - 1.0) < 1e-2  # unbiased std of the advantages is 1 (up to eps)
    for name in ("dr_grpo", "rloo"):
        assert abs(get_advantage_estimator(name)(r, torch.full((len(rewards),), gid)).mean().item()) < 1e-5
