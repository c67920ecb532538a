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


# --------------------------------------------------------------------------------------------- async (issue 13)
def _args(async_enable=False, partial=False, correction="off", dynamic=False):
    return SimpleNamespace(train=SimpleNamespace(async_enable=async_enable, partial_rollout_enable=partial,
                                                 dynamic_batch_enable=dynamic),
                           algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level=correction)))


def test_openrlhf_flags_async_allowed_their_correction_refused_with_our_loss():
    from openrlhf_search.integrations.openrlhf.config import PatchConfig
    from openrlhf_search.integrations.openrlhf.patches import check_openrlhf_args

    calib = PatchConfig(calibadv=True)
    tis = PatchConfig(loss="grpo", offpolicy="tis")
    for patch in (calib, tis):
        check_openrlhf_args(patch, _args(async_enable=True))
        check_openrlhf_args(patch, _args(async_enable=True, partial=True))
    check_openrlhf_args(calib, _args(correction="token"))  # OpenRLHF's own loss stays: its correction is honoured
    with pytest.raises(ValueError, match=r"--algo.advantage.is_correction_level seq: .*\+tis / \+mis"):
        check_openrlhf_args(tis, _args(correction="seq"))
    with pytest.raises(ValueError, match="--train.dynamic_batch_enable"):
        check_openrlhf_args(tis, _args(dynamic=True))
    with pytest.raises(ValueError, match="--train.partial_rollout_enable needs --train.async_enable"):
        check_openrlhf_args(calib, _args(partial=True))


def test_megatron_backend_refuses_async_with_its_reason(monkeypatch):
    from openrlhf_search.integrations.openrlhf import compat
    from openrlhf_search.integrations.openrlhf.patches import apply_megatron_backend

    monkeypatch.setattr(compat, "check_openrlhf_version", lambda: None)
    args = _args(async_enable=True)
    args.ds = SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1, packing_samples=False)
    args.algo.kl = SimpleNamespace(init_coef=0.0)
    args.actor = SimpleNamespace(num_nodes=1, num_gpus_per_node=1)
    backend = SimpleNamespace(backend="megatron", duplicate_actors=1)
    with pytest.raises(ValueError, match=r"--train.async_enable .*weight broadcast"):
        apply_megatron_backend(backend, args)


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_loss_adapter_forwards_rollout_logprobs_as_behaviour(mode):
    """+tis/+mis: OpenRLHF's rollout_log_probs are the behaviour log-probs of the wrapped loss (same loss and
    gradient as calling the corrected registry loss directly); without them the adapter names the setting."""
    from openrlhf_search.algorithms.losses import get_policy_loss
    from openrlhf_search.algorithms.offpolicy import with_offpolicy_correction

    new, old, adv, mask = _batch(b=4, t=6, seed=2)
    behaviour = old + 0.8 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    ours = OpenRLHFPolicyLoss("grpo", {}, mode)
    loss, *_ = ours(new, old, adv, action_mask=mask, rollout_log_probs=behaviour)
    ref, _ = with_offpolicy_correction(get_policy_loss("grpo"), mode)(new, old, adv, mask,
                                                                        behaviour_log_probs=behaviour)
    plain, _ = get_policy_loss("grpo")(new, old, adv, mask)
    assert torch.allclose(loss, ref) and not torch.allclose(loss, plain)
    assert f"search_loss/offpolicy/{'truncated' if mode == 'tis' else 'masked'}_share" in ours.last_metrics
    with pytest.raises(RuntimeError, match="openrlhf.record_rollout_logprobs=true"):
        ours(new, old, adv, action_mask=mask)


def test_staleness_tags_and_metrics():
    from openrlhf_search.integrations.openrlhf import staleness

    assert staleness.trajectory_tags([]) == {"weight_version_min": 0, "weight_version_max": 0}
    assert staleness.trajectory_tags([(2, 2), (2, 3), (3, 3)]) == {"weight_version_min": 2, "weight_version_max": 3}
    def exp(lo, hi):
        return SimpleNamespace(info={"weight_version_min": torch.tensor(lo), "weight_version_max": torch.tensor(hi)})

    exps = [exp([1.0, 3.0], [1.0, 3.0]), exp([2.0], [3.0])]
    metrics = staleness.tag_staleness(exps, trainer_version=3)
    assert exps[0].info["async/staleness"].tolist() == [2.0, 0.0]
    assert exps[1].info["async/staleness"].tolist() == [1.0]
    assert metrics == {"async/staleness_max": 2.0, "async/mixed_version_share": pytest.approx(1 / 3),
                       "async/trainer_version": 3.0}
    assert staleness.tag_staleness([SimpleNamespace(info={})], 1) == {}
    with pytest.raises(RuntimeError, match="inconsistent weight versions"):
        staleness.tag_staleness(exps, trainer_version=2)  # a sample newer than the trainer
    actor = SimpleNamespace()
    assert staleness.engine_version(actor) == 0
    staleness.set_engine_version(actor, 4)
    assert staleness.engine_version(actor) == 4


def test_turn_capped_engine_records_the_version_before_and_after_each_turn():
    """A broadcast landing during a turn (partial rollouts) shows as (start, end) = (v, v + 1)."""
    import asyncio

    from openrlhf_search.integrations.openrlhf import agent_core, staleness

    class Engine:
        async def generate(self, ids, params, multi_modal_data=None):
            staleness.set_engine_version(self, staleness.engine_version(self) + 1)  # an update mid-turn
            return SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1])])

    traj = SimpleNamespace(prompt_ids=[5], response_ids=[])
    episode = SimpleNamespace(new_trajectory=lambda ids, meta: traj, turn_budget=lambda t: 4)
    st = agent_core.EpisodeState(episode=episode)
    engine = Engine()
    staleness.set_engine_version(engine, 2)
    token = agent_core._STATE.set(st)
    try:
        asyncio.run(agent_core.TurnCappedEngine(engine).generate([5], SimpleNamespace(max_tokens=9)))
    finally:
        agent_core._STATE.reset(token)
    assert st.turn_versions == [(2, 3)]


def _fake_openrlhf_trainer(monkeypatch, events):
    """A stand-in ``openrlhf.trainer.ppo_trainer.BasePPOTrainer`` and an async ``TrainingActor`` shaped like
    OpenRLHF 0.11.2's (lock -> pause -> super().broadcast_to_vllm() -> resume)."""
    mod = types.ModuleType("openrlhf.trainer.ppo_trainer")

    class BasePPOTrainer:
        def __init__(self):
            self.vllm_engines = ["e0", "e1"]
            self.experience_maker = SimpleNamespace(compute_advantages_and_returns=lambda exps: exps,
                                                    args=SimpleNamespace(rollout=SimpleNamespace(
                                                        n_samples_per_prompt=1)))  # fmt: skip

        def broadcast_to_vllm(self):
            events.append("broadcast")

    class TrainingActor(BasePPOTrainer):
        def broadcast_to_vllm(self):
            events.append("pause")
            super().broadcast_to_vllm()
            events.append("resume")

    mod.BasePPOTrainer = BasePPOTrainer
    for name in ("openrlhf", "openrlhf.trainer"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "openrlhf.trainer.ppo_trainer", mod)
    return SimpleNamespace(__ray_actor_class__=TrainingActor)


def test_async_training_actor_versions_inside_the_pause_and_hooks_the_maker(monkeypatch):
    from openrlhf_search.integrations.openrlhf import staleness
    from openrlhf_search.integrations.openrlhf.config import PatchConfig
    from openrlhf_search.integrations.openrlhf.patches import make_training_actor_class

    events: list = []
    remote_like = _fake_openrlhf_trainer(monkeypatch, events)
    monkeypatch.setattr(staleness, "publish_engine_version",
                        lambda engines, v: events.append(("publish", tuple(engines), v)))
    cls = make_training_actor_class(remote_like, PatchConfig(calibadv=True))
    trainer = cls()
    assert trainer.openrlhf_search_hooks() == {"maker": True, "advantages": True, "dump": False}
    trainer.broadcast_to_vllm()
    trainer.broadcast_to_vllm()
    assert events == ["pause", "broadcast", ("publish", ("e0", "e1"), 1), "resume",
                      "pause", "broadcast", ("publish", ("e0", "e1"), 2), "resume"]
    exp = SimpleNamespace(info={"weight_version_min": torch.tensor([1.0]), "weight_version_max": torch.tensor([1.0])},
                          action_mask=torch.ones(1, 2))
    monkeypatch.setattr("openrlhf_search.integrations.openrlhf.patches.postprocess_experiences",
                        lambda exps, n, patch: {"calibadv/ran": 1.0})
    trainer.experience_maker.compute_advantages_and_returns([exp])
    assert exp.info["async/staleness"].tolist() == [1.0] and exp.info["calibadv/ran"].tolist() == [1.0]
    assert exp.info["async/trainer_version"].tolist() == [2.0]


def test_trainer_without_an_experience_maker_is_refused(monkeypatch):
    from openrlhf_search.integrations.openrlhf.config import PatchConfig
    from openrlhf_search.integrations.openrlhf.patches import make_training_actor_class

    remote_like = _fake_openrlhf_trainer(monkeypatch, [])
    base = remote_like.__ray_actor_class__
    base.__init__ = lambda self: None  # noqa: E731 -- a layout change: no experience_maker
    with pytest.raises(RuntimeError, match="cannot install CalibAdv"):
        make_training_actor_class(remote_like, PatchConfig(calibadv=True))()
