"""SAPO at its threshold: a positive-advantage token whose ratio is exactly ``t`` is in the conditional KL term.

The paper's term (arXiv 2603.10069, module docstring of ``algorithms.losses``) selects ``1[r_it <= t]``; the
diagnostics' ``drift_share`` and the viewer's marks use the same ``<=``. The boundary matters: ``sapo_threshold:
1.0`` is accepted, and an on-policy step has every ratio exactly 1, so ``<=`` puts every positive token under the
term (a gradient pulling their log-probs up) and ``<`` none of them.
"""

from __future__ import annotations

import math

import pytest
import torch

from openrlhf_search.algorithms import get_policy_loss


def _grad(fn, logp, old, adv, mask):
    x = logp.clone().requires_grad_()
    loss, metrics = fn(x, old, adv, mask)
    (g,) = torch.autograd.grad(loss, x)
    return loss.item(), metrics, g


def test_threshold_one_on_policy_puts_every_positive_token_under_the_term():
    # row 0: A = +1, three model tokens; row 1: A = -1 (never in the term); every ratio exactly 1 (on-policy)
    logp = torch.log(torch.tensor([[0.3, 0.5, 0.2], [0.4, 0.1, 0.6]], dtype=torch.float64))
    old, adv, mask = logp.clone(), torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 3)
    w = 0.5
    loss_s, m_s, g_s = _grad(get_policy_loss("sapo", sapo_threshold=1.0, sapo_coef=w), logp, old, adv, mask)
    loss_p, _, g_p = _grad(get_policy_loss("ppo"), logp, old, adv, mask)
    assert m_s["sapo_token_share"] == 1.0 and m_s["drift_share"] == 1.0  # all 3 positive tokens: ratio 1 <= t
    assert m_s["sapo_penalty"] == 0.0 and loss_s == loss_p  # log ratio 0: no value ...
    # ... but the term's gradient, w * d(-log pi)/d log pi / (model tokens of positive rows), on each positive token
    torch.testing.assert_close(g_s - g_p, torch.tensor([[-w / 3] * 3, [0.0] * 3], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_ratio_exactly_at_the_threshold_counts_as_drifted_and_just_above_it_does_not():
    t = 0.5
    at = math.log(t)
    above = math.log(t * (1 + 1e-6))  # just above t, also in float32 (the diagnostics' precision)
    logp = torch.tensor([[at, above, 0.0]], dtype=torch.float64)
    assert torch.exp(logp)[0, 0].item() == t and torch.exp(logp)[0, 1].item() > t  # the fixture is on the boundary
    old, adv, mask = torch.zeros(1, 3, dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 3)
    w = 1.0
    _, m, g_s = _grad(get_policy_loss("sapo", sapo_threshold=t, sapo_coef=w), logp, old, adv, mask)
    _, _, g_p = _grad(get_policy_loss("ppo", sapo_threshold=t), logp, old, adv, mask)
    assert m["sapo_token_share"] == pytest.approx(1 / 3) and m["drift_share"] == pytest.approx(1 / 3)
    assert m["sapo_penalty"] == pytest.approx(-at / 3)
    torch.testing.assert_close(g_s - g_p, torch.tensor([[-w / 3, 0.0, 0.0]], dtype=torch.float64), rtol=0,
                               atol=1e-12)
