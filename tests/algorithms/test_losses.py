import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_search.algorithms import get_policy_loss
from openrlhf_search.algorithms.losses import aggregate_loss

ALL = ["ppo", "grpo", "dapo", "gspo", "dspo", "sapo"]


def lp(*ratios):
    """log-probs whose ratio to old_log_probs = 0 are the given ratios."""
    return torch.log(torch.tensor([list(ratios)], dtype=torch.float64)).requires_grad_()


# ----------------------------------------------------------------------------------------- golden values
def test_ppo_golden_positive_and_negative_advantage():
    fn = get_policy_loss("ppo")
    logp, old, mask = lp(1.5, 0.5, 1.0), torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3)
    loss, m = fn(logp, old, torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0) / 3)  # r=1.5 clipped to 1.2; r=.5 unclipped for A>0
    assert m["clip_frac_high"] == pytest.approx(1 / 3) and m["clip_frac_low"] == 0.0
    loss, m = fn(logp, old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.0) / 3)  # r=.5 clipped to .8 for A<0
    assert m["clip_frac_low"] == pytest.approx(1 / 3)
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["ratio_mean"] == pytest.approx(1.0) and m["ratio_p50"] == pytest.approx(1.0)


def test_grpo_is_ppo():
    logp, old = lp(1.5, 0.5, 1.0), torch.zeros(1, 3, dtype=torch.float64)
    a = get_policy_loss("grpo")(logp, old, torch.tensor([1.0]), torch.ones(1, 3))[0]
    b = get_policy_loss("ppo")(logp, old, torch.tensor([1.0]), torch.ones(1, 3))[0]
    assert a.item() == b.item()


def test_dual_clip_golden():
    fn = get_policy_loss("ppo", dual_clip=3.0)
    loss, m = fn(lp(5.0, 1.0), torch.zeros(1, 2, dtype=torch.float64), torch.tensor([-1.0]), torch.ones(1, 2))
    assert loss.item() == pytest.approx((3.0 + 1.0) / 2)  # max(5, 1.2)=5 capped at c*|A| = 3
    assert m["clip_frac_dual"] == pytest.approx(0.5)
    loss, _ = get_policy_loss("ppo")(lp(5.0, 1.0), torch.zeros(1, 2, dtype=torch.float64), torch.tensor([-1.0]),
                                     torch.ones(1, 2))  # fmt: skip
    assert loss.item() == pytest.approx((5.0 + 1.0) / 2)


def test_dapo_clip_higher_golden():
    loss, _ = get_policy_loss("dapo")(lp(1.5), torch.zeros(1, 1, dtype=torch.float64), torch.tensor([1.0]),
                                      torch.ones(1, 1))  # fmt: skip
    assert loss.item() == pytest.approx(-1.28)
    loss, _ = get_policy_loss("dapo")(lp(0.5), torch.zeros(1, 1, dtype=torch.float64), torch.tensor([-1.0]),
                                      torch.ones(1, 1))  # fmt: skip
    assert loss.item() == pytest.approx(0.8)


@pytest.mark.parametrize("name", ["gspo", "dspo"])
def test_sequence_ratio_golden(name):
    # log ratios .1, -.3 on model tokens, a retrieved token (masked) with log ratio .5 -> s = exp(-.1)
    logp = torch.tensor([[0.1, -0.3, 0.5]], dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1, 1, 0]])
    fn = get_policy_loss(name)
    loss, m = fn(logp, old, torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx(-math.exp(-0.1))  # A>0, s<1: unclipped
    assert m["ratio_mean"] == pytest.approx(math.exp(-0.1)) and m["model_tokens"] == 2
    loss, m = fn(logp, old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx(1 - 3e-4)  # A<0, s < 1 - 3e-4: clipped at the tight lower bound
    assert m["clip_frac_low"] == 1.0


def test_sapo_golden():
    fn = get_policy_loss("sapo", sapo_threshold=0.5, sapo_coef=0.5)
    # row 0: A=+1, ratios .4 (drifted), .9, 1.2 ; row 1: A=-1 (excluded from the SAPO term and its denominator)
    logp = torch.log(torch.tensor([[0.4, 0.9, 1.2], [0.3, 1.0, 1.0]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(2, 3, dtype=torch.float64)
    loss, m = fn(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    pg = ((-0.4 - 0.9 - 1.2) + (0.8 + 1.0 + 1.0)) / 6
    kl = -math.log(0.4) / 3
    assert m["pg_loss"] == pytest.approx(pg)
    assert m["sapo_penalty"] == pytest.approx(kl)
    assert loss.item() == pytest.approx(pg + 0.5 * kl)
    assert m["drift_share"] == pytest.approx(1 / 3)
    # the term is differentiable through log pi: d/dlogp of 0.5 * (-logp_00)/3 adds -1/6 on the drifted token
    (g,) = torch.autograd.grad(loss, logp)
    assert g[0, 0].item() == pytest.approx(-0.4 / 6 - 0.5 / 3)
    assert g[0, 1].item() == pytest.approx(-0.9 / 6)


def test_sapo_term_selects_whole_sequences_with_token_advantages():
    # CalibAdv-style token advantages: row 1 is a failed rollout (A<0) whose good search turn (tokens 0-1) was zeroed.
    # The term covers the sequences with advantage >= 0 -- row 0 only -- and its denominator counts all of
    # row 0's model tokens; the zeroed tokens of row 1 (one of them drifted) are neither pulled up nor counted.
    fn = get_policy_loss("sapo", sapo_threshold=0.5, sapo_coef=1.0)
    logp = torch.log(torch.tensor([[0.4, 0.9, 1.0], [0.2, 1.0, 1.0]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    _, m = fn(logp, old, adv, torch.ones(2, 3))
    assert m["sapo_penalty"] == pytest.approx(-math.log(0.4) / 3)
    assert m["sapo_token_share"] == pytest.approx(1 / 3)
    # same numbers as the [B] advantages (1, -1): for sequence-constant advantages nothing changes
    _, m_seq = fn(logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 3))
    assert m_seq["sapo_penalty"] == pytest.approx(m["sapo_penalty"])


def test_aggregation_modes_golden():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]]).bool()  # third row: no model token
    assert aggregate_loss(v, m, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(v, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(v, m, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(v, m, "seq-mean-token-sum-norm", 5.0).item() == pytest.approx(10 / (2 * 5))
    assert aggregate_loss(v, m, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_term_golden(est):
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64)).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.25]], dtype=torch.float64))
    old = logp.detach()
    fn = get_policy_loss("ppo", kl_coef=0.1, kl_estimator=est)
    loss, m = fn(logp, old, torch.tensor([0.0]), torch.ones(1, 2), ref_log_probs=ref)
    log_r = math.log(0.5)  # ref/pi on token 0; token 1 has log r = 0
    per_tok = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[est]
    assert m["kl_loss"] == pytest.approx(per_tok / 2)
    assert loss.item() == pytest.approx(0.1 * per_tok / 2)
    assert m["approx_kl_ref"] == pytest.approx((math.exp(log_r) - 1 - log_r) / 2)
    with pytest.raises(ValueError, match="ref_log_probs"):
        fn(logp, old, torch.tensor([0.0]), torch.ones(1, 2))


def test_entropy_bonus_and_metric():
    logp = torch.zeros(1, 2, requires_grad=True)
    ent = torch.tensor([[1.0, 3.0]], requires_grad=True)
    loss, m = get_policy_loss("ppo", entropy_coef=0.01)(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2),
                                                        entropy=ent)  # fmt: skip
    assert m["entropy"] == pytest.approx(2.0) and loss.item() == pytest.approx(-0.02)


def test_shape_errors_name_the_input():
    fn = get_policy_loss("ppo")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="action_mask"):
        fn(x, x, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="advantages"):
        fn(x, x, torch.zeros(3), torch.ones(2, 3))


def test_metrics_are_python_floats():
    x = torch.randn(3, 4, requires_grad=True)
    _, m = get_policy_loss("sapo")(x, x.detach() + 0.1, torch.randn(3), torch.ones(3, 4), entropy=torch.rand(3, 4),
                                   ref_log_probs=x.detach())  # fmt: skip
    assert m and all(type(v) is float for v in m.values())
    for key in ("ratio_mean", "ratio_min", "ratio_max", "ratio_p01", "ratio_p50", "ratio_p99", "clip_frac_low",
                "clip_frac_high", "clip_frac_dual", "drift_share", "sapo_penalty", "approx_kl_old", "approx_kl_ref",
                "entropy"):  # fmt: skip
        assert key in m


# ----------------------------------------------------------------------------------------- autograd checks
def _toy_policy(B=3, T=5, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = False  # a retrieved token
    mask[2, 3:] = False  # padding
    return theta, y, mask


def _logp(theta, y):
    return theta.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)


def test_grpo_token_gradient_matches_eq7():
    """GRPO eq. 7 (unclipped): grad J = 1/G sum_i 1/|o_i| sum_t A_i r_it grad log pi(o_it)."""
    theta, y, mask = _toy_policy()
    with torch.no_grad():
        old = _logp(theta, y) + 0.01 * torch.randn(3, 5, dtype=torch.float64)  # ratios within 1 +- 0.03
    adv = torch.tensor([1.3, -0.7, 0.4], dtype=torch.float64)
    logp = _logp(theta, y)
    loss, m = get_policy_loss("grpo", loss_agg="seq-mean-token-mean")(logp, old, adv, mask)
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0
    (g_loss,) = torch.autograd.grad(loss, theta)
    r = torch.exp(logp.detach() - old)
    w = torch.where(mask, adv[:, None] * r / mask.sum(-1, keepdim=True), torch.zeros_like(r)) / 3
    (g_ref,) = torch.autograd.grad(-(w * _logp(theta, y)).sum(), theta)
    torch.testing.assert_close(g_loss, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gspo", "dspo"])
def test_sequence_gradient_matches_dspo_eq8(name):
    """DSPO eq. 8 (unclipped): grad J = 1/G sum_i A_i s_i 1/|y_i| sum_t grad log pi(y_it)."""
    theta, y, mask = _toy_policy(seed=1)
    with torch.no_grad():
        old = _logp(theta, y) + 1e-5 * torch.randn(3, 5, dtype=torch.float64)  # s_i within the tight clip
    adv = torch.tensor([0.9, -1.1, 0.5], dtype=torch.float64)
    logp = _logp(theta, y)
    loss, m = get_policy_loss(name)(logp, old, adv, mask)
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0
    (g_loss,) = torch.autograd.grad(loss, theta)
    n = mask.sum(-1)
    s = torch.exp(torch.where(mask, logp.detach() - old, torch.zeros_like(old)).sum(-1) / n)
    w = torch.where(mask, (adv * s / n)[:, None].expand(3, 5), torch.zeros_like(old)) / 3
    (g_ref,) = torch.autograd.grad(-(w * _logp(theta, y)).sum(), theta)
    torch.testing.assert_close(g_loss, g_ref, rtol=1e-10, atol=1e-12)
    # and it is the gradient of the plain sequence form -mean_i s_i A_i
    s_graph = torch.exp(torch.where(mask, _logp(theta, y) - old, torch.zeros_like(old)).sum(-1) / n)
    (g_seq,) = torch.autograd.grad(-(s_graph * adv).mean(), theta)
    torch.testing.assert_close(g_loss, g_seq, rtol=1e-10, atol=1e-12)


def test_sequence_clip_zeroes_gradient():
    theta, y, mask = _toy_policy(seed=2)
    with torch.no_grad():
        old = _logp(theta, y) - 0.01  # s = e^.01 > 1 + 4e-4 for every row
    logp = _logp(theta, y)
    loss, m = get_policy_loss("gspo")(logp, old, torch.ones(3, dtype=torch.float64), mask)
    (g,) = torch.autograd.grad(loss, theta)
    assert m["clip_frac_high"] == 1.0 and torch.count_nonzero(g) == 0


def test_gspo_token_advantages_equal_sequence_advantages_when_constant():
    theta, y, mask = _toy_policy(seed=3)
    old = _logp(theta, y).detach() + 1e-5
    adv = torch.tensor([0.5, -0.2, 1.0], dtype=torch.float64)
    fn = get_policy_loss("gspo")
    l1, _ = fn(_logp(theta, y), old, adv, mask)
    l2, _ = fn(_logp(theta, y), old, adv[:, None].expand(3, 5), mask)
    g1 = torch.autograd.grad(l1, theta)[0]
    g2 = torch.autograd.grad(l2, theta)[0]
    assert l1.item() == pytest.approx(l2.item())
    torch.testing.assert_close(g1, g2)


# ----------------------------------------------------------------------------------------- properties
@st.composite
def batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


LOSS_CASES = [(n, {}) for n in ALL] + [
    ("ppo", {"loss_agg": "seq-mean-token-mean", "dual_clip": 3.0}),
    ("ppo", {"loss_agg": "seq-mean-token-sum-norm", "loss_agg_norm": 8.0}),
    ("dapo", {"loss_agg": "seq-mean-token-sum"}),
]


@settings(max_examples=25, deadline=None)
@given(batches(), st.integers(1, 4), st.sampled_from(LOSS_CASES))
def test_invariant_to_padding(batch, pad, case):
    name, cfg = case
    logp, old, adv, mask = batch
    B, T = logp.shape
    fn = get_policy_loss(name, **cfg)
    x = logp.clone().requires_grad_()
    loss, _ = fn(x, old, adv, mask)
    (g,) = torch.autograd.grad(loss, x)
    # right padding with garbage (NaN / inf) on masked positions, and an extra all-padding row
    garbage = torch.full((B, pad), float("nan"), dtype=torch.float64)
    xp = torch.cat([logp, garbage], 1)
    xp = torch.cat([xp, torch.full((1, T + pad), -float("inf"), dtype=torch.float64)], 0).requires_grad_()
    oldp = torch.cat([torch.cat([old, garbage.clone().fill_(float("inf"))], 1), torch.zeros(1, T + pad)], 0)
    maskp = torch.cat([torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], 1), torch.zeros(1, T + pad).bool()])
    advp = torch.cat([adv, torch.tensor([float("nan")], dtype=torch.float64)])
    lossp, _ = fn(xp, oldp, advp, maskp)
    (gp,) = torch.autograd.grad(lossp, xp)
    assert lossp.item() == pytest.approx(loss.item(), abs=1e-12)
    torch.testing.assert_close(gp[:B, :T], g, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(gp[:, T:]) == 0 and torch.count_nonzero(gp[B:]) == 0


@settings(max_examples=25, deadline=None)
@given(batches(), st.sampled_from(ALL))
def test_masked_tokens_get_exactly_zero_gradient(batch, name):
    logp, old, adv, mask = batch
    x = torch.where(mask, logp, torch.full_like(logp, -float("inf"))).requires_grad_()
    oldn = torch.where(mask, old, torch.full_like(old, float("nan")))
    loss, _ = get_policy_loss(name, kl_coef=0.1)(x, oldn, adv, mask, ref_log_probs=oldn)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert torch.all(g[~mask] == 0)


@settings(max_examples=25, deadline=None)
@given(batches(), st.floats(0.05, 0.9))
def test_sapo_equals_ppo_when_no_token_below_threshold(batch, t):
    logp, _, adv, mask = batch
    g = torch.Generator().manual_seed(0)
    old = logp - math.log(t) * torch.rand(logp.shape, generator=g, dtype=torch.float64) * 0.99  # ratio in (t, 1]
    a = logp.clone().requires_grad_()
    b = logp.clone().requires_grad_()
    ls, ms = get_policy_loss("sapo", sapo_threshold=t, sapo_coef=1.0)(a, old, adv, mask)
    lp_, _ = get_policy_loss("ppo", sapo_threshold=t)(b, old, adv, mask)
    assert ms["sapo_penalty"] == 0.0 and ls.item() == lp_.item()
    torch.testing.assert_close(torch.autograd.grad(ls, a)[0], torch.autograd.grad(lp_, b)[0], rtol=0, atol=0)


def test_quantiles_subsample_large_inputs_and_bf16_log_probs():
    from openrlhf_search.algorithms.diagnostics import ratio_quantiles

    x = torch.arange(1001, dtype=torch.float32)
    assert ratio_quantiles(x, max_quantile_elems=100)[1] == pytest.approx(500, abs=10)
    assert ratio_quantiles(torch.zeros(0)) != ratio_quantiles(torch.zeros(0))  # nan when empty
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, m = get_policy_loss("ppo")(logp, logp.detach().float() - 0.01, torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.dtype == torch.float32 and m["ratio_mean"] == pytest.approx(math.exp(0.01), rel=1e-4)
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16
