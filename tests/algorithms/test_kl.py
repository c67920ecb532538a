import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_search.algorithms import kl_penalty


def test_golden_and_mask():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.2, float("nan")]]))
    mask = torch.tensor([[1, 1, 0]])
    lr = math.log(0.5)
    for est, val in (("k1", -lr), ("k2", 0.5 * lr * lr), ("k3", math.exp(lr) - 1 - lr)):
        out = kl_penalty(logp, ref, mask, est)
        assert out[0, 0].item() == pytest.approx(val, rel=1e-6)
        assert out[0, 1].item() == 0.0 and out[0, 2].item() == 0.0  # equal probs -> 0; masked NaN -> 0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_k3_unbiased_and_nonnegative(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (p * (p / q).log()).sum()
    # expectation under p of the per-token estimates == exact KL(p || q) for k1 and k3
    for est in ("k1", "k3"):
        per = kl_penalty(p.log()[None], q.log()[None], None, est)[0]
        assert (p * per).sum().item() == pytest.approx(exact.item(), rel=1e-9, abs=1e-12)
    assert (kl_penalty(p.log()[None], q.log()[None], None, "k3") >= 0).all()
    assert (kl_penalty(p.log()[None], q.log()[None], None, "k2") >= 0).all()


def test_unknown_estimator():
    with pytest.raises(KeyError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), None, "k4")
