"""The global loss normaliser: one optimizer step's objective is independent of how it is cut into micro-batches.

Every loss name x every aggregation (plus the KL, entropy and SAPO terms): the batch as 1, 2 or 4 micro-batches,
each called with the step's normaliser (:func:`step_normalizers`) and the losses SUMMED, gives the gradient of the
single-batch loss to float tolerance. The planted mistake (micro-batch means, no normaliser) is shown to differ.
"""

from __future__ import annotations

import pytest
import torch

from openrlhf_search.algorithms import get_policy_loss, loss_normalizer, sapo_normalizer, step_normalizers
from openrlhf_search.algorithms.losses import ADDITIVE_METRICS, LOSS_AGGREGATIONS, POLICY_LOSSES

B, T = 8, 10


def _batch(seed: int = 0, token_adv: bool = False):
    """Uneven masks (one row all masked, one with a single token), off-policy ratios (some far below 0.5)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 1, 7, 0, 3, 9, 5, 10])
    mask = torch.arange(T)[None] < lengths[:, None]
    mask[2, 3:5] = False  # a retrieved passage inside the response
    old = -torch.rand(B, T, generator=g) * 3 - 0.1
    new = old + torch.randn(B, T, generator=g) * 0.6
    new[mask.logical_not()] = float("nan")  # masked positions must not leak into the gradient
    adv = torch.randn(B, generator=g)
    adv[0] = abs(adv[0]) + 0.5  # a long positive row, so SAPO's term has tokens
    if token_adv:
        adv = adv[:, None].expand(B, T).clone()
        adv[5, :4] = -0.3  # CalibAdv-like: part of a row negative
    ref = old + torch.randn(B, T, generator=g) * 0.2
    entropy = torch.rand(B, T, generator=g) * 2
    return new, old, adv, mask, ref, entropy


CASES = [(name, agg) for name in POLICY_LOSSES.names() for agg in LOSS_AGGREGATIONS.names()]
TERMS = {"sapo_coef": 0.7, "kl_coef": 0.3, "entropy_coef": 0.05, "sapo_threshold": 0.6}


def _grads(fn, batch, splits: int | None):
    """Gradients w.r.t. log-probs and entropy (and the summed loss) with ``splits`` micro-batches and the step's
    normaliser; ``splits=None``: one call without a normaliser (the reference); ``-k``: k micro-batches WITHOUT
    the normaliser, averaged (the old behaviour)."""
    new, old, adv, mask, ref, entropy = batch
    new = new.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    if splits is None:
        loss, metrics = fn(new, old, adv, mask, ref_log_probs=ref, entropy=ent)
        loss.backward()
        return new.grad, ent.grad, loss.detach(), metrics
    rows = torch.arange(B).chunk(abs(splits))
    if splits < 0:
        total = sum(fn(new[r], old[r], adv[r], mask[r], ref_log_probs=ref[r], entropy=ent[r])[0] for r in rows)
        (total / len(rows)).backward()
        return new.grad, ent.grad, total.detach() / len(rows), {}
    norms = step_normalizers([(mask[r], adv[r]) for r in rows], fn.config)
    total, summed = 0.0, dict.fromkeys(ADDITIVE_METRICS, 0.0)
    for r in rows:
        loss, metrics = fn(new[r], old[r], adv[r], mask[r], ref_log_probs=ref[r], entropy=ent[r], **norms)
        loss.backward()  # gradient accumulation: one backward per micro-batch
        total = total + loss.detach()
        for k in summed:
            summed[k] += metrics.get(k, 0.0)
    return new.grad, ent.grad, total, summed


@pytest.mark.parametrize(("name", "agg"), CASES)
@pytest.mark.parametrize("token_adv", [False, True], ids=["seq_adv", "token_adv"])
def test_normaliser_micro_batches_give_the_same_gradient(name, agg, token_adv):
    fn = get_policy_loss(name, loss_agg=agg, **TERMS)
    batch = _batch(seed=len(name) + len(agg), token_adv=token_adv)
    ref_gnew, ref_gent, ref_loss, ref_metrics = _grads(fn, batch, None)
    assert ref_gnew.abs().sum() > 0 and torch.isfinite(ref_gnew).all()
    assert ref_metrics["sapo_token_share"] > 0, "the SAPO term must be active in this batch"
    for splits in (1, 2, 4):
        gnew, gent, loss, summed = _grads(fn, batch, splits)
        where = f"{name} {agg} {splits} micro-batches"
        assert torch.allclose(gnew, ref_gnew, atol=1e-6, rtol=1e-5), where
        assert torch.allclose(gent, ref_gent, atol=1e-7, rtol=1e-5), where
        assert loss == pytest.approx(ref_loss.item(), abs=1e-6, rel=1e-5), where
        for key in ADDITIVE_METRICS:  # the shares sum to the step's value
            assert summed[key] == pytest.approx(ref_metrics[key], abs=1e-6, rel=1e-5), f"{where} {key}"


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS.names())
def test_normaliser_planted_mistake_mean_of_micro_batch_means_differs(agg):
    """The old behaviour (each micro-batch its own mean) trains another objective: the test above can fail."""
    fn = get_policy_loss("sapo", loss_agg=agg, **TERMS)
    batch = _batch(seed=3)
    ref_gnew = _grads(fn, batch, None)[0]
    wrong = _grads(fn, batch, -4)[0]
    assert not torch.allclose(wrong, ref_gnew, atol=1e-5, rtol=1e-3)


def test_normaliser_counts_and_contract():
    _, _, adv, mask, _, _ = _batch()
    assert int(loss_normalizer(mask, "token-mean")) == int(mask.sum())
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert int(loss_normalizer(mask, mode)) == 7  # row 3 has no model token
    nonneg = (adv >= 0)[:, None] & mask
    assert int(sapo_normalizer(mask, adv)) == int(nonneg.sum())
    with pytest.raises(KeyError, match="token-men"):
        loss_normalizer(mask, "token-men")
    # the contract: a plain float normaliser is accepted and equals the local count's result
    fn = get_policy_loss("grpo")
    new, old, adv, mask, _, _ = _batch()
    local, _ = fn(new, old, adv, mask)
    given, _ = fn(new, old, adv, mask, normalizer=float(mask.sum()))
    half, _ = fn(new, old, adv, mask, normalizer=2 * float(mask.sum()))
    assert torch.allclose(local, given) and torch.allclose(half, local / 2)


def test_normaliser_sapo_needs_its_own_global_count():
    fn = get_policy_loss("sapo")
    new, old, adv, mask, _, _ = _batch()
    with pytest.raises(ValueError, match="sapo_normalizer"):
        fn(new, old, adv, mask, normalizer=10.0)
    assert set(step_normalizers([(mask, adv)], fn.config)) == {"normalizer", "sapo_normalizer"}
    assert set(step_normalizers([(mask, adv)], get_policy_loss("grpo").config)) == {"normalizer"}


def test_normaliser_all_masked_step_is_zero_not_nan():
    fn = get_policy_loss("sapo", kl_coef=0.1)
    new, old, adv, mask, ref, _ = _batch()
    mask = torch.zeros_like(mask)
    new = new.nan_to_num(0.0).requires_grad_()
    loss, _ = fn(new, old, adv, mask, ref_log_probs=ref, **step_normalizers([(mask, adv)], fn.config))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(new.grad, torch.zeros_like(new))
