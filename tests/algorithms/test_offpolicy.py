import math

import pytest
import torch

from openrlhf_search.algorithms import get_algorithm, get_policy_loss
from openrlhf_search.algorithms.offpolicy import (
    OffPolicyConfig,
    masked_is,
    offpolicy_diagnostics,
    staleness,
    truncated_is_weights,
    with_offpolicy_correction,
)

LN = math.log


def _case():
    # row 0: rho = 1, 3, 0.25 on model tokens, last token padding (NaN behind the mask)
    # row 1: rho = 0.5, 2 on model tokens, token 2 is a retrieved passage (masked)
    old = torch.tensor([[LN(0.3), LN(0.6), LN(0.05), float("nan")], [LN(0.2), LN(0.8), 0.0, 0.0]])
    beh = torch.tensor([[LN(0.3), LN(0.2), LN(0.2), float("nan")], [LN(0.4), LN(0.4), 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return old, beh, mask


def test_token_tis_golden():
    old, beh, mask = _case()
    w, m = truncated_is_weights(old, beh, mask, cap=2.0)
    expected = torch.tensor([[1.0, 2.0, 0.25, 0.0], [0.5, 2.0, 0.0, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6)
    assert m["offpolicy/truncated_share"] == pytest.approx(1 / 5)  # only rho = 3 is cut (rho = 2 is not > cap)
    assert m["offpolicy/weight_mean"] == pytest.approx(5.75 / 5)
    assert m["offpolicy/rho_q0.5"] == pytest.approx(1.0)
    assert m["offpolicy/rho_mean"] == pytest.approx((1 + 3 + 0.25 + 0.5 + 2) / 5)


def test_sequence_tis_golden():
    old, beh, mask = _case()
    w, m = truncated_is_weights(old, beh, mask, cap=2.0, level="sequence")
    r0 = math.exp((LN(1) + LN(3) + LN(0.25)) / 3)  # (0.75)^(1/3)
    r1 = math.exp((LN(0.5) + LN(2)) / 2)  # 1
    expected = torch.tensor([[r0, r0, r0, 0.0], [r1, r1, 0.0, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6)
    assert m["offpolicy/truncated_share"] == 0.0
    w, m = truncated_is_weights(old, beh, mask, cap=0.95, level="sequence")
    assert torch.allclose(w[0, :3], torch.full((3,), r0)) and torch.allclose(w[1, :2], torch.full((2,), 0.95))
    assert m["offpolicy/truncated_share"] == pytest.approx(0.5)  # one of two sequences


def test_token_and_sequence_mis_golden():
    old, beh, mask = _case()
    new, m = masked_is(old, beh, mask, low=0.4, high=2.5)
    assert new.tolist() == [[True, False, False, False], [True, True, False, False]]
    assert m["offpolicy/masked_share"] == pytest.approx(2 / 5)
    new, m = masked_is(old, beh, mask, low=0.95, high=1.05, level="sequence")
    assert new.tolist() == [[False, False, False, False], [True, True, False, False]]
    assert m["offpolicy/masked_share"] == pytest.approx(0.5)


def test_no_nan_leaks_from_masked_positions():
    old, beh, mask = _case()
    for level in ("token", "sequence"):
        w, m = truncated_is_weights(old, beh, mask, level=level)
        assert torch.isfinite(w).all()
        keep, _ = masked_is(old, beh, mask, level=level)
        assert not keep[0, 3]
        assert all(math.isfinite(v) for v in m.values())


def test_staleness_and_diagnostics():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    versions = torch.tensor([[3, 4, 5, 0], [5, 5, 0, 0], [0, 0, 0, 0]])
    assert staleness(versions, mask, 5).tolist() == [2, 0, 0]  # padding versions (0) are ignored
    m = offpolicy_diagnostics(torch.zeros(3, 4), mask, token_versions=versions, current_version=5)
    assert m["offpolicy/staleness_max"] == 2.0 and m["offpolicy/staleness_mean"] == 1.0
    assert m["offpolicy/staleness_2_share"] == 0.5 and m["offpolicy/staleness_0_share"] == 0.5


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="tis_cap"):
        OffPolicyConfig(tis_cap=0).validate()
    with pytest.raises(ValueError, match="mode"):
        with_offpolicy_correction(get_policy_loss("grpo"), "foo")


def _inputs(seed=0, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2
    beh = old + torch.randn(B, T, generator=g) * 0.7
    lp = (old + torch.randn(B, T, generator=g) * 0.05).requires_grad_(True)  # inside the clip range
    adv = torch.tensor([1.0, -0.5, 2.0])[:B]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    return lp, old, beh, adv, mask


def test_tis_gradient_is_weighted_gradient():
    """d loss / d log pi equals the uncorrected per-token gradient times w (sum aggregation removes the mean)."""
    lp, old, beh, adv, mask = _inputs()
    base = get_policy_loss("grpo", clip_low=0.5, clip_high=0.5, loss_agg="seq-mean-token-sum")
    wrapped = with_offpolicy_correction(base, "tis", tis_cap=2.0)
    loss, m = wrapped(lp, old, adv, mask, behaviour_log_probs=beh)
    (g_corr,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    loss2, _ = base(lp2, old, adv, mask)
    (g_base,) = torch.autograd.grad(loss2, lp2)
    w, _ = truncated_is_weights(old, beh, mask, 2.0)
    assert torch.allclose(g_corr, g_base * w, atol=1e-6)
    assert (g_corr[~mask] == 0).all()
    assert "offpolicy/truncated_share" in m and "pg_loss" in m


def test_mis_gradient_zero_on_masked_tokens_and_equals_base_elsewhere():
    lp, old, beh, adv, mask = _inputs(1)
    base = get_policy_loss("grpo", loss_agg="seq-mean-token-sum")
    wrapped = with_offpolicy_correction(base, "mis", mis_low=0.7, mis_high=1.4)
    loss, m = wrapped(lp, old, adv, mask, behaviour_log_probs=beh)
    (g,) = torch.autograd.grad(loss, lp)
    keep, _ = masked_is(old, beh, mask, 0.7, 1.4)
    assert 0 < m["offpolicy/masked_share"] < 1  # the case really masks something
    assert (g[~keep] == 0).all()
    lp2 = lp.detach().clone().requires_grad_(True)
    (g_base,) = torch.autograd.grad(base(lp2, old, adv, keep)[0], lp2)
    assert torch.allclose(g, g_base)


def test_sequence_level_follows_the_wrapped_loss():
    lp, old, beh, adv, mask = _inputs(2)
    dspo = get_algorithm("dspo+tis").build_loss()
    assert dspo.offpolicy.mode == "tis"
    _, m = dspo(lp, old, adv, mask, behaviour_log_probs=beh)
    w, _ = truncated_is_weights(old, beh, mask, 2.0, level="sequence")
    assert m["offpolicy/weight_mean"] == pytest.approx(float(w[mask].mean()), rel=1e-6)


def test_identity_when_behaviour_equals_old():
    lp, old, _, adv, mask = _inputs(3)
    for name in ("grpo", "dspo", "sapo"):
        base = get_algorithm(name).build_loss()
        for mode in ("tis", "mis"):
            loss, _ = with_offpolicy_correction(base, mode)(lp, old, adv, mask, behaviour_log_probs=old.clone())
            assert torch.allclose(loss, base(lp, old, adv, mask)[0])


def test_missing_behaviour_log_probs_is_a_clear_error():
    lp, old, _, adv, mask = _inputs()
    with pytest.raises(ValueError, match="behaviour_log_probs"):
        get_algorithm("grpo+tis").build_loss()(lp, old, adv, mask)


@pytest.mark.parametrize("name,mode", [("grpo+tis", "tis"), ("dspo+mis", "mis"), ("sapo+tis", "tis"),
                                       ("calibadv+mis", "mis")])
def test_presets_accept_offpolicy_modifiers(name, mode):
    preset = get_algorithm(name)
    assert preset.offpolicy == mode
    assert getattr(preset.build_loss(), "needs_behaviour_log_probs", False)
    assert not getattr(get_algorithm(name.split("+")[0]).build_loss(), "needs_behaviour_log_probs", False)
    with pytest.raises(ValueError, match="tis.*mis|at most one"):
        get_algorithm("grpo+tis+mis")
