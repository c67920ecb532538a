"""OpenRLHF 0.11.2 ``train_ppo_ray`` flags of a training config: the pure translation of the OpenRLHF backend.

The algorithm preset of :func:`openrlhf_search.algorithms.get_algorithm` is mapped onto OpenRLHF's *own* features
where they compute the same thing (:data:`NATIVE_LOSSES`, :data:`ESTIMATORS`, dynamic filtering) and onto our
injected code where they do not (:mod:`.patches`: SAPO, CalibAdv, GSPO/DSPO with per-token advantages, any other loss
config, described by the :class:`~.config.PatchConfig` returned with the flags).

Mapping caveats (documented in docs/openrlhf.md): OpenRLHF's dynamic filtering keeps a group when its *mean* score
lies strictly inside ``(0, 1)``, which equals DSPO's mixed-outcome rule for binary rewards; for graded rewards it
also keeps zero-spread groups (their advantages are 0, so they only dilute the batch). OpenRLHF's ``group_norm``
divides by ``std + 1e-9`` where ours uses ``std + 1e-6``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from openrlhf_search.algorithms.advantages import ADVANTAGE_ESTIMATORS
from openrlhf_search.algorithms.losses import make_config
from openrlhf_search.algorithms.presets import AlgorithmPreset, advantage_pipeline, preset_for
from openrlhf_search.plugins import load_plugins
from openrlhf_search.registry import Registry
from openrlhf_search.trainer.config import TrainConfig

from .config import OpenRLHFConfig, PatchConfig

PACKAGE_DIR = Path(__file__).resolve().parent
AGENT_FILE = PACKAGE_DIR / "agent_func.py"
"""The file OpenRLHF loads as ``--train.agent_func_path``."""

ESTIMATORS: Registry[str] = Registry("OpenRLHF-native advantage estimator")
"""Our advantage estimator name -> OpenRLHF's ``--algo.advantage.estimator`` computing the same outcome advantage.
Any other estimator of our registry (a plugin's included) runs in the patched experience maker instead."""
for _ours, _theirs in (("grpo", "group_norm"), ("dr_grpo", "dr_grpo"), ("rloo", "rloo")):
    ESTIMATORS.add(_ours, _theirs)


def _plain_terms(cfg: dict) -> bool:
    """No loss term OpenRLHF's ``PolicyLoss`` lacks (SAPO term, KL or entropy inside the loss) and its ratio clamp."""
    return (cfg["sapo_coef"] == 0 and cfg["kl_coef"] == 0 and cfg["entropy_coef"] == 0
            and cfg["log_ratio_clamp"] == 20.0)  # fmt: skip


def _native_ppo(cfg: dict, calibadv: bool) -> list[str] | None:
    """OpenRLHF's ``ppo`` loss: token ratio, clip-low/high, dual clip, token-mean or seq-mean-token-mean."""
    if cfg["ratio_level"] != "token" or cfg["loss_agg"] not in ("token-mean", "seq-mean-token-mean"):
        return None
    if not _plain_terms(cfg):
        return None
    flags = ["--actor.policy_loss_type", "ppo", "--actor.loss_agg_mode", cfg["loss_agg"],
             "--actor.eps_clip_low_high", _num(cfg["clip_low"]), _num(cfg["clip_high"])]  # fmt: skip
    if cfg["dual_clip"] is not None:
        flags += ["--actor.dual_clip", _num(cfg["dual_clip"])]
    return flags


def _native_gspo(cfg: dict, calibadv: bool) -> list[str] | None:
    """OpenRLHF's ``gspo`` loss equals ours for sequence-constant advantages only (not after CalibAdv: OpenRLHF's
    ratio is the sequence ratio on every token, ours is GSPO-token, which differ when advantages vary per token)."""
    if calibadv or cfg["ratio_level"] != "sequence" or cfg["loss_agg"] != "seq-mean-token-mean":
        return None
    if not _plain_terms(cfg) or cfg["dual_clip"] is not None:
        return None
    return ["--actor.policy_loss_type", "gspo",
            "--actor.eps_clip_low_high", _num(cfg["clip_low"]), _num(cfg["clip_high"])]  # fmt: skip


NATIVE_LOSSES: Registry[Callable[[dict, bool], list[str] | None]] = Registry("OpenRLHF-native loss")
for _name, _fn in (("ppo", _native_ppo), ("grpo", _native_ppo), ("dapo", _native_ppo), ("gspo", _native_gspo),
                   ("dspo", _native_gspo)):  # fmt: skip
    NATIVE_LOSSES.add(_name, _fn)
"""Our loss name -> function of its *resolved* config (every ``PolicyLossConfig`` field) giving OpenRLHF's native
flags, or ``None`` when OpenRLHF cannot express it (then :mod:`.patches` injects ours). Losses not listed
(``sapo``, user-registered ones) are always injected."""


def _num(x: float) -> str:
    return repr(float(x))

def advantage_chain(config: TrainConfig, preset: AlgorithmPreset) -> tuple[str, dict, list[tuple[str, dict]]]:
    """``(estimator, estimator_config, post-processor chain)`` of ``config.algorithm`` on top of ``preset``: the
    same resolution as the local trainer (:func:`~openrlhf_search.algorithms.presets.advantage_pipeline`)."""
    return advantage_pipeline(preset, config.algorithm)


def resolve_algorithm(config: TrainConfig) -> tuple[list[str], PatchConfig, list[str]]:
    """Map ``config.algorithm`` onto OpenRLHF flags and a :class:`PatchConfig`; also return explanatory notes."""
    plugins = list(getattr(config, "plugins", []) or [])
    load_plugins(plugins, source="plugins")
    alg = config.algorithm
    preset = preset_for(alg)
    loss_cfg = {**preset.loss_cfg, **alg.loss_overrides}
    notes = [f"algorithm {preset.name}: {preset.description}"]
    estimator, estimator_cfg, chain = advantage_chain(config, preset)
    patch = PatchConfig(plugins=plugins, postprocessors=[[n, c] for n, c in chain],
                        calibadv=any(n == "calibadv" for n, _ in chain),
                        calibadv_config=next((c for n, c in chain if n == "calibadv"), {}))  # fmt: skip
    if estimator in ESTIMATORS and not estimator_cfg:
        flags = ["--algo.advantage.estimator", ESTIMATORS.get(estimator)]
    else:  # OpenRLHF computes group_norm, then the patched experience maker recomputes ours from the rewards
        ADVANTAGE_ESTIMATORS.get(estimator)  # an unknown name fails here, with "did you mean"
        flags = ["--algo.advantage.estimator", "group_norm"]
        patch.estimator, patch.estimator_config = estimator, dict(estimator_cfg)
        notes.append(f"advantage estimator {estimator}: injected from openrlhf_search (after OpenRLHF's)")
    resolved = dataclasses.asdict(make_config(preset.policy_loss, **loss_cfg))  # validates the overrides too
    for key, hint in (("kl_coef", "set algorithm.kl_coef (OpenRLHF's own KL loss) instead"),
                      ("entropy_coef", "pass --actor.entropy_coef through openrlhf.extra_args instead")):  # fmt: skip
        if resolved.get(key, 0) > 0:  # a plugin loss's config need not have these fields
            raise ValueError(f"algorithm.loss_overrides.{key}={resolved[key]}: OpenRLHF does not pass reference "
                             f"log-probs or entropies to the policy loss; {hint}")  # fmt: skip
    native_fn = NATIVE_LOSSES.get(preset.policy_loss) if preset.policy_loss in NATIVE_LOSSES else None
    native = native_fn(resolved, bool(chain)) if native_fn is not None and not preset.offpolicy else None
    if native is not None:
        flags += native
        notes.append(f"loss {preset.policy_loss}: OpenRLHF's native loss ({' '.join(native[:2])})")
    else:
        patch.loss, patch.loss_config = preset.policy_loss, loss_cfg
        flags += ["--actor.policy_loss_type", "ppo"]  # replaced in the actors by openrlhf_search's loss
        notes.append(f"loss {preset.policy_loss}: injected from openrlhf_search ({loss_cfg})")
    if preset.offpolicy:  # our loss wrapped with TIS/MIS; behaviour log-probs = OpenRLHF's rollout_log_probs
        patch.offpolicy = preset.offpolicy
        notes.append(f"+{preset.offpolicy}: off-policy correction with vLLM's rollout log-probs as the behaviour "
                     "policy (OpenRLHF's --algo.advantage.is_correction_* stays off)")
    if preset.dynamic_filter:
        flags += ["--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0.0", "1.0"]
        notes.append("dynamic filtering: OpenRLHF's (keeps groups with 0 < mean score < 1); filtered prompts are "
                     "consumed from the steps x prompts_per_step dataset, so fewer optimizer steps may run")
    if any(n == "calibadv" for n, _ in chain):
        notes.append("CalibAdv: injected after OpenRLHF's advantage computation")
    if any(n != "calibadv" for n, _ in chain):
        notes.append(f"advantage post-processors {[n for n, _ in chain]}: injected after OpenRLHF's advantages")
    if alg.kl_coef > 0:
        flags += ["--algo.kl.use_loss", "--algo.kl.init_coef", _num(alg.kl_coef), "--algo.kl.estimator",
                  alg.kl_estimator]  # fmt: skip
    else:
        flags += ["--algo.kl.init_coef", "0.0"]
    return flags, patch, notes


def response_budget(config: TrainConfig, orl: OpenRLHFConfig) -> int:
    """OpenRLHF's response length: ``env.max_response_tokens``, else ``env.max_total_tokens`` minus the prompt's."""
    env = config.env
    if env.max_response_tokens is not None:
        return int(env.max_response_tokens)
    budget = int(env.max_total_tokens) - orl.max_prompt_tokens
    if budget < 1:
        raise ValueError(f"env.max_total_tokens={env.max_total_tokens} leaves no response budget after "
                         f"openrlhf.max_prompt_tokens={orl.max_prompt_tokens}; set env.max_response_tokens")
    return budget


def flag_problems(config: TrainConfig, orl: OpenRLHFConfig) -> list[str]:
    """Every reason the config cannot be translated into OpenRLHF flags (``[]`` if none), one line each."""
    out = []
    model = config.model.path
    if model in ("tiny", "smollm2") or not model:
        out.append(f"model.path={model!r}: the OpenRLHF backend needs a Hugging Face checkpoint directory or hub id "
                   "(vLLM and DeepSpeed load it by path)")  # fmt: skip
    ro, opt = config.rollout, config.optimizer
    samples_per_step = ro.prompts_per_step * ro.group_size
    if config.algorithm.num_minibatches >= 1 and samples_per_step % config.algorithm.num_minibatches:
        out.append(f"algorithm.num_minibatches={config.algorithm.num_minibatches} must divide "
                   f"rollout.prompts_per_step x rollout.group_size = {samples_per_step}")  # fmt: skip
    if opt.schedule not in SCHEDULES:
        out.append(f"optimizer.schedule={opt.schedule!r}: {SCHEDULES.unknown_message(opt.schedule)}")
    if config.env.max_response_tokens is None and config.env.max_total_tokens - orl.max_prompt_tokens < 1:
        out.append(f"env.max_total_tokens={config.env.max_total_tokens} leaves no response budget after "
                   f"openrlhf.max_prompt_tokens={orl.max_prompt_tokens}; set env.max_response_tokens")  # fmt: skip
    try:
        _, patch, _ = resolve_algorithm(config)
    except (KeyError, ValueError, TypeError) as exc:
        return out + [str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)]
    if patch.offpolicy and not orl.record_rollout_logprobs:
        out.append(f"algorithm.name={config.algorithm.name!r} (+{patch.offpolicy}) needs vLLM's log-probs of the "
                   "sampled tokens: set openrlhf.record_rollout_logprobs=true")  # fmt: skip
    given = [a for a in orl.extra_args if a.split("=")[0].startswith("--algo.advantage.is_correction")]
    if patch.loss and given:
        out.append(f"openrlhf.extra_args {given}: OpenRLHF's is_correction_* runs inside the PolicyLoss that "
                   f"openrlhf_search's loss patch ({patch.loss!r}) replaces; use the algorithm's +tis / +mis "
                   "modifier instead (e.g. algorithm.name=grpo+tis)")  # fmt: skip
    return out


def build_flags(config: TrainConfig, orl: OpenRLHFConfig,
                paths: dict[str, Path]) -> tuple[list[str], PatchConfig, list[str]]:
    """OpenRLHF ``train_ppo_ray`` flags for ``config`` (see the module docstring); pure."""
    problems = flag_problems(config, orl)
    if problems:
        raise ValueError("; ".join(problems))
    model, ro, opt = config.model.path, config.rollout, config.optimizer
    samples_per_step = ro.prompts_per_step * ro.group_size
    alg_flags, patch, notes = resolve_algorithm(config)
    flags = [
        "--actor.model_name_or_path", model,
        "--train.agent_func_path", str(paths["agent_py"]),
        "--data.prompt_dataset", str(paths["prompts"]),
        "--data.input_key", "input",
        "--data.label_key", "label",
        "--data.max_len", str(orl.max_prompt_tokens + response_budget(config, orl)),
        "--data.max_samples", str(config.steps * ro.prompts_per_step),
        "--train.num_episodes", "1",
        "--train.seed", str(config.seed),
        "--rollout.batch_size", str(ro.prompts_per_step),
        "--rollout.n_samples_per_prompt", str(ro.group_size),
        "--rollout.micro_batch_size", str(orl.micro_rollout_batch_size),
        "--rollout.temperature", _num(ro.temperature),
        "--rollout.top_p", _num(ro.top_p),
        "--train.batch_size", str(samples_per_step // config.algorithm.num_minibatches),
        "--train.micro_batch_size", str(orl.micro_train_batch_size),
        "--train.max_epochs", str(config.algorithm.ppo_epochs),
        "--actor.adam.lr", _num(opt.lr),
        "--actor.adam.betas", _num(opt.betas[0]), _num(opt.betas[1]),
        "--actor.adam.weight_decay", _num(opt.weight_decay),
        "--actor.max_norm", _num(opt.grad_clip),
        "--actor.lr_warmup_ratio", _num(opt.warmup_steps / max(config.steps, 1)),
        "--actor.lr_scheduler", SCHEDULES.get(opt.schedule),
        *alg_flags,
        "--actor.num_nodes", str(orl.actor_num_nodes),
        "--actor.num_gpus_per_node", str(orl.actor_num_gpus_per_node),
        "--vllm.num_engines", str(orl.vllm_num_engines),
        "--vllm.tensor_parallel_size", str(orl.vllm_tensor_parallel_size),
        "--vllm.gpu_memory_utilization", _num(orl.vllm_gpu_memory_utilization),
        "--vllm.sync_backend", orl.vllm_sync_backend,
        "--ds.zero_stage", str(orl.zero_stage),
        "--ds.param_dtype", orl.param_dtype,
        "--ds.attn_implementation", orl.attn_implementation,
        "--ckpt.output_dir", str(paths["output"] / "model"),
        "--ckpt.path", str(paths["output"] / "checkpoints"),
        "--ckpt.save_steps", str(save_steps(config, orl)),
        "--ckpt.max_num", str(max(int(config.logging.keep_checkpoints), 1)),
        "--logger.logging_steps", "1",
    ]  # fmt: skip
    if config.algorithm.kl_coef > 0:
        flags += ["--ref.num_nodes", str(orl.ref_num_nodes), "--ref.num_gpus_per_node", str(orl.ref_num_gpus_per_node)]
    if config.model.lora_rank > 0:  # the same model.lora_* fields as the local trainer (OpenRLHF merges for vLLM)
        flags += ["--ds.lora.rank", str(config.model.lora_rank), "--ds.lora.alpha", str(config.model.lora_alpha),
                  "--ds.lora.dropout", str(config.model.lora_dropout),
                  "--ds.lora.target_modules", *config.model.lora_target_modules]  # fmt: skip
    switches = {
        "--train.colocate_all": orl.colocate_all,
        "--vllm.enable_sleep": orl.colocate_all and orl.vllm_enable_sleep,  # OpenRLHF drops it otherwise
        "--ds.enable_sleep": orl.colocate_all and orl.vllm_enable_sleep,
        "--vllm.enforce_eager": orl.vllm_enforce_eager,
        "--actor.gradient_checkpointing_enable": orl.gradient_checkpointing,
        "--ds.adam_offload": orl.adam_offload,
        "--ds.packing_samples": orl.packing_samples,
        "--vllm.enable_prefix_caching": orl.vllm_enable_prefix_caching,
        "--ckpt.save_hf": orl.save_hf and save_steps(config, orl) > 0,
        "--ckpt.load_enable": orl.resume,
    }
    flags += [flag for flag, on in switches.items() if on]
    if config.logging.tensorboard:
        flags += ["--logger.tensorboard_dir", str(paths["output"] / "tensorboard")]
    if config.logging.wandb_project:
        flags += ["--logger.wandb.project", config.logging.wandb_project,
                  "--logger.wandb.run_name", Path(config.logging.output_dir).name or "openrlhf-search",
                  "--logger.wandb.key", WANDB_KEY_FROM_ENV]  # fmt: skip
    if orl.async_train:
        flags += ["--train.async_enable", "--train.async_queue_size", str(orl.async_queue_size)]
        if orl.partial_rollout:
            flags.append("--train.partial_rollout_enable")
        notes.append(f"asynchronous training: OpenRLHF's PPOTrainerAsync, queue {orl.async_queue_size} batch(es)"
                     + (", partial rollouts (vLLM paused, not drained, for each weight sync)" if orl.partial_rollout
                        else "") + "; staleness logged as async/*")  # fmt: skip
    flags += list(orl.extra_args)
    return flags, patch, notes


def save_steps(config: TrainConfig, orl: OpenRLHFConfig) -> int:
    """``--ckpt.save_steps``: ``openrlhf.save_steps``, else ``logging.save_every`` when > 0, else -1 (final model
    only)."""
    if orl.save_steps != -1:
        return int(orl.save_steps)
    every = int(getattr(config.logging, "save_every", 0) or 0)
    return every if every > 0 else -1


WANDB_KEY_FROM_ENV = "from-env"
"""Placeholder passed as ``--logger.wandb.key``: OpenRLHF enables W&B only when that flag is non-empty, and calls
``wandb.login(key=...)`` only when wandb has no key of its own, so the real key stays in ``WANDB_API_KEY`` (forwarded
to the Ray workers by the entrypoint) and never appears on a command line or in ``--dry-run`` output."""


SCHEDULES: Registry[str] = Registry("learning-rate schedule (OpenRLHF backend)")
"""Our ``optimizer.schedule`` -> OpenRLHF's ``--actor.lr_scheduler`` (a transformers scheduler name)."""
for _ours, _theirs in (("constant", "constant_with_warmup"), ("cosine", "cosine_with_min_lr"), ("linear", "linear")):
    SCHEDULES.add(_ours, _theirs)


