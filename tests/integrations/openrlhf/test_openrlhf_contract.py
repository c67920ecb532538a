"""Contracts with the installed OpenRLHF 0.11.2 (needs the OpenRLHF venv: ``scripts/test_openrlhf.sh``).

* every flag the launcher emits is accepted by OpenRLHF's own ``train_ppo_ray`` parser and lands where intended;
* the injected loss is called by OpenRLHF's own ``ActorPPOTrainer.training_step`` with exactly the arguments it
  passes, returns what it unpacks, and its metrics reach the step status;
* where OpenRLHF has the same loss natively, ours gives the same values and gradients;
* CalibAdv runs after OpenRLHF's own ``compute_advantages_and_returns``.
"""

from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

import pytest

pytest.importorskip("openrlhf")
pytestmark = pytest.mark.openrlhf

import torch  # noqa: E402

from openrlhf_search.integrations.openrlhf.config import OpenRLHFConfig, PatchConfig  # noqa: E402

ALGORITHMS = ["grpo", "dr_grpo", "dapo", "gspo", "dspo", "sapo", "calibadv", "dspo+calibadv", "sapo+calibadv",
              "grpo+calibadv+tis", "dspo+mis"]


def openrlhf_args(argv):
    from openrlhf.utils.config import hierarchize

    from openrlhf_search.integrations.openrlhf.compat import openrlhf_argument_parser

    return hierarchize(openrlhf_argument_parser().parse_args(argv))


def test_version_is_pinned():
    from openrlhf_search.integrations.openrlhf.compat import OPENRLHF_VERSION, check_openrlhf_version

    assert check_openrlhf_version() == OPENRLHF_VERSION == "0.11.2"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("cluster", [{}, {"actor_num_nodes": 2, "zero_stage": 3, "vllm_tensor_parallel_size": 2,
                                          "colocate_all": False, "vllm_sync_backend": "gloo",
                                          "shared_dir": "/shared/run", "retrieval_host": "10.0.0.1"},
                                     {"colocate_all": False, "async_train": True, "async_queue_size": 2,
                                      "partial_rollout": True, "actor_num_gpus_per_node": 4,
                                      "ref_num_gpus_per_node": 2, "vllm_num_engines": 2}])
def test_every_emitted_flag_is_accepted_by_openrlhf(algorithm, cluster):
    from openrlhf_search.integrations.openrlhf.plan import build_plan
    from openrlhf_search.trainer.config import load_config

    cfg = load_config(None, ["model.path=/models/m", "retriever.spec=/idx", f"algorithm.name={algorithm}",
                             "algorithm.kl_coef=0.001"])  # fmt: skip
    plan = build_plan(cfg, OpenRLHFConfig(**cluster))
    flags = plan.command[3:]
    args = openrlhf_args(flags)  # argparse exits on any unknown flag or bad value
    assert args.actor.model_name_or_path == "/models/m"
    assert args.train.agent_func_path == str(plan.command[plan.command.index("--train.agent_func_path") + 1])
    assert args.rollout.n_samples_per_prompt == cfg.rollout.group_size
    assert args.algo.advantage.estimator == "group_norm" or algorithm == "dr_grpo"
    assert args.algo.kl.use_loss is True and args.algo.kl.init_coef == pytest.approx(0.001)
    assert args.ds.zero_stage == cluster.get("zero_stage", 2)
    assert args.vllm.sync_with_ray is False
    assert args.train.async_enable is cluster.get("async_train", False)
    assert args.train.partial_rollout_enable is cluster.get("partial_rollout", False)
    assert args.algo.advantage.is_correction_level == "off"


def test_cluster_flags_land_in_openrlhf_args(tmp_path):
    """Prefix caching, resume, checkpoint interval/count, HF checkpoints and W&B, as OpenRLHF 0.11.2 parses them."""
    from openrlhf_search.integrations.openrlhf.flags import WANDB_KEY_FROM_ENV
    from openrlhf_search.integrations.openrlhf.plan import build_plan
    from openrlhf_search.trainer.config import load_config

    cfg = load_config(None, ["model.path=/models/m", "retriever.spec=/idx", "logging.save_every=20",
                             "logging.keep_checkpoints=5", "logging.wandb_project=search-agents",
                             f"logging.output_dir={tmp_path / 'grpo-run'}"])  # fmt: skip
    args = openrlhf_args(build_plan(cfg, OpenRLHFConfig(resume=True)).command[3:])
    assert args.vllm.enable_prefix_caching is True and args.ckpt.load_enable is True
    assert args.ckpt.save_steps == 20 and args.ckpt.max_num == 5 and args.ckpt.save_hf is True
    assert args.ckpt.path == str(tmp_path / "grpo-run" / "openrlhf" / "checkpoints")
    assert args.ckpt.output_dir == str(tmp_path / "grpo-run" / "openrlhf" / "model")
    # OpenRLHF builds its WandbLogger only when the key is non-empty (PPOTrainer: `if args.logger.wandb.key`)
    assert args.logger.wandb.key == WANDB_KEY_FROM_ENV and args.logger.wandb.project == "search-agents"
    assert args.logger.wandb.run_name == "grpo-run"
    plain = openrlhf_args(build_plan(load_config(None, ["model.path=/m", "retriever.spec=/i"])).command[3:])
    assert plain.ckpt.load_enable is False and plain.ckpt.save_hf is False and plain.logger.wandb.key is None


def test_lora_flags_land_in_openrlhf_args_and_openrlhfs_actor_adapts_every_linear_layer(tmp_path):
    """model.lora_* reach OpenRLHF 0.11.2's own parser as --ds.lora.* (rank, alpha, dropout, target modules), and the
    target modules our policy actor hands OpenRLHF's ``Actor`` make peft adapt every linear layer. OpenRLHF parses
    the flag with nargs="*", so ``all-linear`` arrives as ``['all-linear']``, which peft does not expand (it looks
    for a module of that name); the actor passes :func:`lora_target_modules` of it (the string)."""
    from openrlhf.models import Actor
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openrlhf_search.integrations.openrlhf.patches import lora_target_modules
    from openrlhf_search.integrations.openrlhf.plan import build_plan
    from openrlhf_search.trainer.config import load_config

    cfg = load_config(None, ["model.path=/m", "retriever.spec=/i", "model.lora_rank=16", "model.lora_alpha=32",
                             "model.lora_dropout=0.05"])  # fmt: skip
    args = openrlhf_args(build_plan(cfg).command[3:])
    assert args.ds.lora.rank == 16 and args.ds.lora.alpha == 32 and args.ds.lora.dropout == 0.05
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=64)).save_pretrained(tmp_path)  # fmt: skip
    lora = {"lora_rank": args.ds.lora.rank, "lora_alpha": args.ds.lora.alpha, "lora_dropout": args.ds.lora.dropout}
    parsed = args.ds.lora.target_modules
    with pytest.raises(ValueError, match="all-linear"):  # what OpenRLHF's own actor does with its parsed value
        Actor(str(tmp_path), attn_implementation="eager", param_dtype="bf16", target_modules=parsed, **lora)
    actor = Actor(str(tmp_path), attn_implementation="eager", param_dtype="bf16",
                  target_modules=lora_target_modules(parsed), **lora)  # fmt: skip
    adapted = {n.rsplit(".", 1)[-1] for n, m in actor.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_vllm_engines_report_processed_logprobs(monkeypatch):
    """Without --algo.advantage.is_correction_level, OpenRLHF asks vLLM for raw (pre-temperature) log-probs; the
    entrypoint's wrapper makes ``create_vllm_engines`` pass ``logprobs_mode="processed_logprobs"`` to every engine
    (called positionally, as ``train_ppo_ray`` does)."""
    import openrlhf.trainer.ray as ray_pkg
    import openrlhf.trainer.ray.vllm_engine as vllm_engine_mod

    from openrlhf_search.integrations.openrlhf import entrypoint

    monkeypatch.setattr(vllm_engine_mod, "create_vllm_engines", vllm_engine_mod.create_vllm_engines)
    monkeypatch.setattr(ray_pkg, "create_vllm_engines", ray_pkg.create_vllm_engines)
    created = []

    class FakeActor:
        @staticmethod
        def options(**kwargs):
            return SimpleNamespace(remote=lambda **kw: created.append(kw) or object())

    monkeypatch.setattr(vllm_engine_mod, "RolloutRayActor", FakeActor)
    monkeypatch.setattr(vllm_engine_mod, "PlacementGroupSchedulingStrategy", lambda **kw: None)
    entrypoint.request_processed_logprobs()
    assert ray_pkg.create_vllm_engines is vllm_engine_mod.create_vllm_engines
    # the same positional call as openrlhf/cli/train_ppo_ray.py (is_correction_level == "off" -> None)
    ray_pkg.create_vllm_engines(2, 1, "/m", 42, False, True, True, 4096, object(), 0.4, False, None,
                                agent_func_path="a.py", remote_rm_url=["agent"])  # fmt: skip
    assert [kw["logprobs_mode"] for kw in created] == ["processed_logprobs"] * 2
    assert all(kw["enable_prefix_caching"] is True for kw in created)
    created.clear()
    ray_pkg.create_vllm_engines(1, 1, "/m", 42, False, False, True, 4096, object(), 0.4, False, "processed_logprobs")
    assert created[0]["logprobs_mode"] == "processed_logprobs"


def _fake_actor_trainer(loss_name, loss_cfg=None):
    """An ``ActorPPOTrainer`` without its heavy ``__init__`` (no DeepSpeed): just what ``training_step`` reads."""
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    from openrlhf_search.integrations.openrlhf.patches import install_loss

    class Actor(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.shift = torch.nn.Parameter(torch.zeros(base.shape[1]))

        def forward(self, sequences, action_mask, **kwargs):
            return self.base + self.shift, SimpleNamespace(aux_loss=None, entropy=None)

    trainer = object.__new__(ActorPPOTrainer)
    args = openrlhf_args(["--actor.model_name_or_path", "m"])
    base = -torch.rand(4, 6) - 0.1
    trainer.actor = Actor(base)
    trainer.args = args
    trainer.strategy = SimpleNamespace(args=args, ring_attn_group=None, backward=lambda loss, m, o: loss.backward(),
                                       optimizer_step=lambda *a, **k: None, get_grad_norm=lambda m: 0.0)  # fmt: skip
    trainer.actor_optim = trainer.ema_model = trainer.replay_buffer = None
    trainer.actor_scheduler = SimpleNamespace(get_last_lr=lambda: [1e-6])
    trainer.aux_loss = False
    install_loss(trainer, PatchConfig(loss=loss_name, loss_config=loss_cfg or {}))
    return trainer, base


def _experience(base, seed=0):
    from openrlhf.trainer.ppo_utils.experience import Experience

    g = torch.Generator().manual_seed(seed)
    b, t = base.shape
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    adv = torch.randn(b, 1, generator=g).expand(b, t) * mask
    return Experience(
        sequences=torch.randint(0, 50, (b, t + 1), generator=g),
        attention_mask=torch.ones(b, t + 1, dtype=torch.long),
        action_mask=mask,
        action_log_probs=base + 0.05 * torch.randn(b, t, generator=g),
        rollout_log_probs=base + 0.01,
        advantages=adv,
        info={},
    )


def test_injected_loss_receives_exactly_what_openrlhf_passes():
    trainer, base = _fake_actor_trainer("sapo", {"sapo_coef": 0.5})
    exp = _experience(base)
    calls = []
    loss_module = trainer.actor_loss_fn
    original_forward = loss_module.forward

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original_forward(*args, **kwargs)

    loss_module.forward = spy
    batch_info = {"dp_size": 1, "batch_num_tokens": exp.action_mask.sum().float(), "global_batch_size": 4.0}
    loss_module.begin_step([exp])  # the loss's step counts (ppo_train's wrapped window iterator does this)
    status = trainer.training_step(exp, 0.0, 0, batch_info)
    assert len(calls) == 1
    args, kwargs = calls[0]
    bound = inspect.signature(original_forward).bind(*args, **kwargs)  # every argument has a parameter
    assert torch.equal(bound.arguments["log_probs"].detach(), base)  # the actor's fresh log-probs
    assert bound.arguments["old_log_probs"] is exp.action_log_probs
    assert bound.arguments["advantages"] is exp.advantages
    assert bound.arguments["action_mask"] is exp.action_mask
    assert bound.arguments["rollout_log_probs"] is exp.rollout_log_probs
    assert {k: bound.arguments[k] for k in batch_info} == batch_info
    assert trainer.actor.shift.grad is not None and trainer.actor.shift.grad.abs().sum() > 0
    metrics = status["metrics"]
    for key in ("search_loss/sapo_penalty", "search_loss/pg_loss", "search_loss/rollout_logprob_abs_diff"):
        assert key in metrics and status["weights"][key] == "token"
    assert metrics["search_loss/rollout_logprob_abs_diff"].item() == pytest.approx(
        ((exp.action_log_probs - exp.rollout_log_probs).abs() * exp.action_mask).sum().item()
        / exp.action_mask.sum().item(), rel=1e-5)  # fmt: skip
    assert "policy_loss" in metrics and "ppo_kl" in metrics


@pytest.mark.parametrize(("loss_name", "agg"), [("sapo", "token-mean"), ("sapo", "seq-mean-token-mean"),
                                                ("gspo", "seq-mean-token-sum")])
def test_normaliser_openrlhf_windows_and_training_step_give_the_global_gradient(loss_name, agg):
    """OpenRLHF's own optimizer-step windows (``iter_grad_accum_global_norm``, wrapped by install_loss) and its own
    ``training_step`` over 4 uneven micro-batches (gas = 4, DeepSpeed's 1/gas emulated): the accumulated gradient
    is the gradient of our loss on the whole step, SAPO's KL term included."""
    import openrlhf.trainer.ray.ppo_actor as ppo_actor_mod

    trainer, base = _fake_actor_trainer(loss_name, {"loss_agg": agg, "sapo_threshold": 0.99})
    gas = 4
    trainer.strategy.backward = lambda loss, m, o: (loss / gas).backward()  # DeepSpeed scales by 1/gas
    exps = [_experience(base, seed=s) for s in range(gas)]
    for k, e in enumerate(exps):
        e.action_mask[k % 4, 1 + k :] = False  # uneven token counts per micro-batch
        e.advantages = e.advantages * e.action_mask
    if loss_name == "sapo":
        assert getattr(ppo_actor_mod.iter_grad_accum_global_norm, "_search_wrapped", False)
    windows = ppo_actor_mod.iter_grad_accum_global_norm(exps, trainer.strategy, gas, lambda e: e.action_mask)
    for step, (exp, info) in enumerate(windows):
        trainer.training_step(exp, 0.0, step, info)
    accumulated = trainer.actor.shift.grad.clone()

    shift = torch.zeros(base.shape[1], requires_grad=True)
    cat = {k: torch.cat([getattr(e, k) for e in exps]) for k in ("action_log_probs", "advantages", "action_mask")}
    loss, metrics = trainer.actor_loss_fn.loss_fn((base + shift).repeat(gas, 1), cat["action_log_probs"],
                                                  cat["advantages"], cat["action_mask"].bool())  # fmt: skip
    loss.backward()
    if loss_name == "sapo":
        assert metrics["sapo_token_share"] > 0
    assert shift.grad.abs().sum() > 0
    assert torch.allclose(accumulated, shift.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("ours", "theirs"), [("grpo", {"policy_loss_type": "ppo"}),
                                              ("dapo", {"policy_loss_type": "ppo", "clip_eps_high": 0.28}),
                                              ("dspo", {"policy_loss_type": "gspo", "clip_eps_low": 3e-4,
                                                        "clip_eps_high": 4e-4})])  # fmt: skip
def test_native_equivalents_match_openrlhf(ours, theirs):
    """Where the launcher uses OpenRLHF's loss natively, ours computes the same thing (values and gradients), with
    each side's own per-optimizer-step normalisers: OpenRLHF's ``_optimizer_step_loss_norm`` of the step's masks for
    its loss, :meth:`OpenRLHFPolicyLoss.begin_step` of the same step's micro-batches for ours (as ``ppo_train`` runs
    them: a step of two micro-batches, gas 2, two DP ranks)."""
    from openrlhf.models import PolicyLoss
    from openrlhf.utils.loss_utils import _optimizer_step_loss_norm

    from openrlhf_search.integrations.openrlhf.patches import OpenRLHFPolicyLoss

    g = torch.Generator().manual_seed(3)
    b, t = 4, 7
    mask = torch.ones(b, t)
    mask[0, 5:] = 0
    old = -torch.rand(b, t, generator=g) - 0.2
    adv = torch.randn(b, 1, generator=g).expand(b, t) * mask  # sequence-constant advantages
    other_mask = torch.ones(3, 5)  # the step's other micro-batch: one empty sequence, one short one
    other_mask[1] = 0
    other_mask[2, 2:] = 0
    step = [SimpleNamespace(action_mask=mask, advantages=adv),
            SimpleNamespace(action_mask=other_mask, advantages=torch.randn(3, 1, generator=g).expand(3, 5))]
    info = _optimizer_step_loss_norm([m.action_mask for m in step], None, dp_size=2, gas=2)
    assert info["batch_num_tokens"] != mask.sum() and info["global_batch_size"] != b  # the step's counts, not ours
    grads, values = [], []
    ours_fn = OpenRLHFPolicyLoss(ours)
    ours_fn.begin_step(step, gas=2)
    for fn in (ours_fn, PolicyLoss(**theirs)):
        new = (old + 0.3 * torch.randn(b, t, generator=torch.Generator().manual_seed(4))).requires_grad_()
        loss = fn(new, old, adv, action_mask=mask, **info)[0]
        loss.backward()
        values.append(loss.detach())
        grads.append(new.grad * mask)
    assert torch.allclose(values[0], values[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_calibadv_runs_after_openrlhf_advantages():
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    from openrlhf_search.algorithms.calibadv import CalibRecord, SearchTurn, calibrate_advantages
    from openrlhf_search.integrations.openrlhf import calib_store
    from openrlhf_search.integrations.openrlhf.patches import install_maker_hooks

    args = openrlhf_args(["--actor.model_name_or_path", "m", "--algo.advantage.estimator", "group_norm",
                          "--rollout.n_samples_per_prompt", "2"])  # fmt: skip
    maker = object.__new__(RemoteExperienceMaker)
    maker.strategy, maker.args, maker.advantage_estimator = SimpleNamespace(args=args), args, "group_norm"
    maker.kl_ctl = SimpleNamespace(value=0.0)
    t = 8
    recs = [{"search_turns": [{"start": 0, "end": 3, "doc_ids": ["a", "b"], "repeated": False}],
             "answer_span": [4, 6], "f1": f1, "valid_format": True} for f1 in (1.0, 0.0, 0.0, 1.0)]  # fmt: skip
    rewards = [1.0, 0.0, 0.0, 1.0]
    experiences = []
    for rows in ([0, 1], [2, 3]):
        mask = torch.zeros(2, t, dtype=torch.bool)
        mask[:, 0:3] = True
        mask[:, 4:6] = True
        ids = [calib_store.new_record_id() for _ in rows]
        for i, r in zip(ids, rows):
            calib_store.publish(i, recs[r])
        exp = Experience(sequences=torch.zeros(2, t + 1, dtype=torch.long), action_mask=mask,
                         attention_mask=torch.ones(2, t + 1, dtype=torch.long),
                         rewards=torch.tensor([rewards[r] for r in rows]), kl=torch.zeros(2, t),
                         info={"calib_id": torch.tensor(ids)}, index=list(rows))  # fmt: skip
        experiences.append(exp)
    plain = maker.compute_advantages_and_returns(copy.deepcopy(experiences))
    install_maker_hooks(maker, PatchConfig(calibadv=True))
    calibrated = maker.compute_advantages_and_returns(experiences)
    seq_adv = torch.cat([e.advantages[:, 0] for e in plain])
    mask = torch.cat([e.action_mask for e in plain])
    records = [CalibRecord([SearchTurn(**s) for s in r["search_turns"]], tuple(r["answer_span"]), r["f1"], True)
               for r in recs]  # fmt: skip
    expected, _ = calibrate_advantages(seq_adv, records, mask, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(torch.cat([e.advantages for e in calibrated]), expected)
    assert not torch.allclose(expected, torch.cat([e.advantages for e in plain]))
    assert all("calib_id" not in e.info and "calibadv/missing_records" in e.info for e in calibrated)


def test_apply_patches_swaps_the_ray_actor_classes():
    """The sync trainer and the async controller are both swapped; the async controller builds our TrainingActor,
    whose MRO puts the versioned broadcast between OpenRLHF's TrainingActor (lock, pause/resume) and
    BasePPOTrainer."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer_mod
    import openrlhf.trainer.ppo_trainer_async as async_mod
    import openrlhf.trainer.ray.ppo_actor as ppo_actor_mod

    from openrlhf_search.integrations.openrlhf import patches

    before = (ppo_actor_mod.PolicyModelActor, ppo_trainer_mod.PPOTrainer, async_mod.PPOTrainerAsync)
    try:
        patches.apply_patches(PatchConfig(loss="sapo", calibadv=True),
                              openrlhf_args(["--train.async_enable", "--train.partial_rollout_enable"]))
        actor_cls = ppo_actor_mod.PolicyModelActor.__ray_actor_class__
        trainer_cls = ppo_trainer_mod.PPOTrainer.__ray_actor_class__
        assert issubclass(actor_cls, before[0].__ray_actor_class__) and actor_cls._patch_config.loss == "sapo"
        assert issubclass(trainer_cls, before[1].__ray_actor_class__) and trainer_cls._patch_config.calibadv
        assert patches._remote_options(ppo_actor_mod.PolicyModelActor) == patches._remote_options(before[0])
        controller = async_mod.PPOTrainerAsync.__ray_actor_class__
        assert issubclass(controller, before[2].__ray_actor_class__)
        training = controller._training_cls
        mro = [c.__name__ for c in training.__mro__]
        assert mro[:4] == ["SearchTrainingActor", "TrainingActor", "WeightVersionedBroadcast", "BasePPOTrainer"]
        assert training._patch_config.calibadv and async_mod.TrainingActor is patches._PATCHED["TrainingActor"]
        with pytest.raises(ValueError, match="is_correction_level token"):
            patches.apply_patches(PatchConfig(loss="sapo"),
                                  openrlhf_args(["--algo.advantage.is_correction_level", "token"]))
    finally:
        ppo_actor_mod.PolicyModelActor, ppo_trainer_mod.PPOTrainer, async_mod.PPOTrainerAsync = before


def test_shared_files_are_checked_on_every_ray_node(tmp_path):
    """The entrypoint's start check: a path missing on a Ray node fails naming path and node (one local node here)."""
    import ray

    from openrlhf_search.integrations.openrlhf.entrypoint import check_shared_files

    present = tmp_path / "prompts.jsonl"
    present.write_text("{}\n")
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        check_shared_files([str(present)])
        with pytest.raises(RuntimeError, match=r"not visible on every Ray node: .*missing\.jsonl \(node "):
            check_shared_files([str(present), str(tmp_path / "missing.jsonl")])
    finally:
        ray.shutdown()
