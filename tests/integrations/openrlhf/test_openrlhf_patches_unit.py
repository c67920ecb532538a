"""Our side of the OpenRLHF patches, without OpenRLHF: the loss adapter's normalization, CalibAdv over right-padded
micro-batches, the record store and the CPU shim's post-import hook (main suite)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from openrlhf_search.algorithms.calibadv import CalibRecord, SearchTurn, calibrate_advantages
from openrlhf_search.integrations.openrlhf import calib_store, cpu_shim
from openrlhf_search.integrations.openrlhf.patches import OpenRLHFPolicyLoss, calibrate_experiences


def _batch(b=3, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :2] = False
    mask[2, 4:] = False
    old = -torch.rand(b, t, generator=g) - 0.1
    new = (old + 0.05 * torch.randn(b, t, generator=g)).requires_grad_()
    adv = torch.randn(b, generator=g)[:, None].expand(b, t).clone()
    return new, old, adv, mask


def test_loss_adapter_matches_our_loss_on_one_micro_batch():
    new, old, adv, mask = _batch()
    ours = OpenRLHFPolicyLoss("sapo", {"sapo_coef": 0.3})
    loss, clip_ratio, ppo_kl, vllm_kl, filt = ours(new, old, adv, action_mask=mask)
    ref, metrics = ours.loss_fn(new, old, adv, mask)
    assert torch.allclose(loss, ref)
    assert vllm_kl is None and filt is None
    assert ours.last_metrics["search_loss/sapo_penalty"] == pytest.approx(metrics["sapo_penalty"])
    expected_kl = -((new - old) * mask).sum() / mask.sum()
    assert torch.allclose(ppo_kl, expected_kl.detach())


@pytest.mark.parametrize("loss_name", ["grpo", "dspo", "sapo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_loss_adapter_normaliser_gives_the_global_gradient(loss_name, agg):
    """2 DP ranks x 2 micro-batches with OpenRLHF's counts (global / gas) and DeepSpeed's scaling (1/gas per
    backward, mean over ranks) give the gradient of our loss on the whole step, SAPO term included."""
    new, old, adv, mask = _batch(b=8, t=6, seed=1)
    mask[5, 1:] = False  # uneven micro-batches
    new.data[0] -= 1.5  # drifted tokens in a positive row: SAPO's term is active
    adv[0] = 1.0
    cfg = {"loss_agg": agg, "sapo_threshold": 0.6} if loss_name == "sapo" else {"loss_agg": agg}
    ours = OpenRLHFPolicyLoss(loss_name, cfg)
    full, metrics = ours.loss_fn(new, old, adv, mask)
    (g_full,) = torch.autograd.grad(full, new)
    if loss_name == "sapo":
        assert metrics["sapo_token_share"] > 0
    dp, gas = 2, 2
    rows = [slice(2 * i, 2 * i + 2) for i in range(dp * gas)]  # rank r gets micro-batches 2r, 2r+1
    n_tok, n_seq = mask.sum().float(), (mask.sum(-1) > 0).sum().float()
    info = {"dp_size": dp, "batch_num_tokens": n_tok / gas, "global_batch_size": n_seq / gas}
    ours.begin_step([SimpleNamespace(action_mask=mask[r], advantages=adv[r]) for r in rows], gas)  # = all-reduced
    total = sum(ours(new[r], old[r], adv[r], action_mask=mask[r], **info)[0] / gas for r in rows) / dp
    (g_parts,) = torch.autograd.grad(total, new)
    assert torch.allclose(total, full, atol=1e-6)
    assert torch.allclose(g_parts, g_full, atol=1e-6, rtol=1e-5)


def test_loss_adapter_sapo_without_its_step_count_is_refused():
    new, old, adv, mask = _batch()
    ours = OpenRLHFPolicyLoss("sapo")
    with pytest.raises(RuntimeError, match="begin_step"):
        ours(new, old, adv, action_mask=mask, dp_size=1, batch_num_tokens=mask.sum().float(), global_batch_size=3.0)


def test_rollout_mismatch_metric():
    new, old, adv, mask = _batch()
    ours = OpenRLHFPolicyLoss("grpo")
    ours(new, old, adv, action_mask=mask, rollout_log_probs=old + 0.25)
    assert ours.last_metrics["search_loss/rollout_logprob_abs_diff"] == pytest.approx(0.25, abs=1e-6)


def _record(turns, answer, f1, valid=True):
    return {"search_turns": [{"start": s, "end": e, "doc_ids": d, "repeated": False} for s, e, d in turns],
            "answer_span": answer, "f1": f1, "valid_format": valid}  # fmt: skip


def test_calibrate_experiences_equals_one_call_over_the_whole_batch():
    """Micro-batches of different padded widths give the same advantages as one calibrate_advantages call."""
    recs = [
        _record([(1, 4, ["d1", "d2"])], (5, 8), 1.0),
        _record([(1, 4, ["d1", "d3"])], (5, 7), 0.0),
        _record([(0, 3, ["d2"])], (3, 5), 1.0),
        _record([(0, 2, ["d9"]), (3, 4, ["d2"])], (4, 6), 0.0),
    ]
    widths = [9, 9, 6, 6]
    masks = [torch.zeros(w, dtype=torch.bool) for w in widths]
    for m, r in zip(masks, recs):
        for t in r["search_turns"]:
            m[t["start"] : t["end"]] = True
        m[r["answer_span"][0] : r["answer_span"][1]] = True
    seq_adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    exps = []
    for rows in ([0, 1], [2, 3]):
        w = max(widths[r] for r in rows)
        mask = torch.zeros(len(rows), w, dtype=torch.bool)
        for i, r in enumerate(rows):
            mask[i, : widths[r]] = masks[r]
        ids = []
        for r in rows:
            ids.append(calib_store.new_record_id())
            calib_store.publish(ids[-1], recs[r])
        exps.append(SimpleNamespace(action_mask=mask, advantages=seq_adv[rows][:, None] * mask.float(), index=rows,
                                    info={"calib_id": torch.tensor(ids)[:, None]}))  # fmt: skip
    metrics = calibrate_experiences(exps, n_samples_per_prompt=2)
    full_mask = torch.zeros(4, 9, dtype=torch.bool)
    for r in range(4):
        full_mask[r, : widths[r]] = masks[r]
    records = [CalibRecord([SearchTurn(**t) for t in r["search_turns"]], tuple(r["answer_span"]), r["f1"], True)
               for r in recs]  # fmt: skip
    expected, ref_metrics = calibrate_advantages(seq_adv, records, full_mask, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(exps[0].advantages, expected[:2])
    assert torch.allclose(exps[1].advantages, expected[2:, :6])
    assert not torch.allclose(expected, seq_adv[:, None] * full_mask.float())  # CalibAdv changed something
    assert metrics["calibadv/missing_records"] == 0.0
    assert all("calib_id" not in e.info for e in exps)
    assert set(ref_metrics) <= {k.removeprefix("calibadv/") for k in metrics} | set(metrics)


def test_calibrate_experiences_requires_ids():
    exp = SimpleNamespace(action_mask=torch.ones(1, 2), advantages=torch.ones(1, 2), index=[0], info={})
    with pytest.raises(RuntimeError, match="calib_records=true"):
        calibrate_experiences([exp], 1)


def test_record_store_is_bounded_fifo():
    store = calib_store._Records(max_records=2)
    for i in range(3):
        store.put(i, {"i": i})
    assert store.size() == 2
    assert store.pop_many([0, 1, 2, 1]) == [None, {"i": 1}, {"i": 2}, None]


def test_post_import_hook_runs_after_module_executes(tmp_path, monkeypatch):
    (tmp_path / "shim_probe_mod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    finder = cpu_shim._PostImportFinder({"shim_probe_mod": lambda m: seen.append(m.VALUE)})
    sys.meta_path.insert(0, finder)
    try:
        import shim_probe_mod  # noqa: F401
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("shim_probe_mod", None)
    assert seen == [1]


def test_shim_is_off_without_the_switch(monkeypatch):
    monkeypatch.delenv(cpu_shim.SWITCH_ENV, raising=False)
    monkeypatch.setattr(cpu_shim, "_INSTALLED", [])
    assert cpu_shim.install() is False


def test_torch_cuda_patch_maps_to_cpu(monkeypatch):
    fake_cuda = types.SimpleNamespace(is_available=lambda: False)
    fake_torch = types.SimpleNamespace(cuda=fake_cuda, device=torch.device)
    cpu_shim.patch_torch_cuda(fake_torch)
    assert fake_cuda.current_device() == torch.device("cpu")
    assert fake_cuda.synchronize() is None and fake_cuda.set_device(3) is None
    assert torch.zeros(2).to(fake_cuda.current_device()).device.type == "cpu"
