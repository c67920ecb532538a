"""``openrlhf-search train --backend openrlhf``: build and run OpenRLHF 0.11.2's ``train_ppo_ray`` from our config.

The launcher is a translation, not a trainer. From :class:`~openrlhf_search.trainer.config.TrainConfig` (what to
train: model, data, environment, algorithm, optimizer) and :class:`~.config.OpenRLHFConfig` (where: GPUs, engines,
ZeRO, retrieval server) it builds

1. OpenRLHF's dotted flags (:func:`build_flags`), with the algorithm preset of
   :func:`openrlhf_search.algorithms.get_algorithm` mapped onto OpenRLHF's *own* features where they compute the same
   thing (:data:`NATIVE_LOSSES`, :data:`ESTIMATORS`, dynamic filtering) and onto our injected code where they do not
   (:mod:`.patches`: SAPO, CalibAdv, GSPO/DSPO with per-token advantages, any other loss config);
2. the prompt dataset (JSONL ``{"input": rendered prompt, "label": {"question", "golden_answers"}}``; the prompt is
   rendered with the project's template and the model's chat template, so OpenRLHF's ``apply_chat_template`` stays
   off), the agent config and the patch config (JSON);
3. the command ``python -m openrlhf_search.integrations.openrlhf.entrypoint <flags>`` and its environment.

``--dry-run`` prints the environment and command and touches nothing. Otherwise the launcher writes the files,
starts ``openrlhf-search serve`` on ``retriever.spec`` unless ``openrlhf.retrieval_url`` names a running server,
waits for its ``/health``, runs the command and stops the server.

Mapping caveats (documented in docs/openrlhf.md): OpenRLHF's dynamic filtering keeps a group when its *mean* score
lies strictly inside ``(0, 1)``, which equals DSPO's mixed-outcome rule for binary rewards; for graded rewards it
also keeps zero-spread groups (their advantages are 0, so they only dilute the batch). OpenRLHF's ``group_norm``
divides by ``std + 1e-9`` where ours uses ``std + 1e-6``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openrlhf_search.registry import Registry

from .cluster import check_command, cluster_from_env, gpus_needed, model_heads, nodes_spanned
from .config import (
    AGENT_CONFIG_ENV,
    CPU_SHIM_ENV,
    PATCH_CONFIG_ENV,
    SHARED_FILES_ENV,
    AgentConfig,
    OpenRLHFConfig,
    PatchConfig,
    agent_config_from_tree,
    from_dict,
    to_json_file,
)

PACKAGE_DIR = Path(__file__).resolve().parent
AGENT_FILE = PACKAGE_DIR / "agent_func.py"
"""The file OpenRLHF loads as ``--train.agent_func_path``."""
SITECUSTOMIZE_DIR = PACKAGE_DIR / "sitecustomize"
"""Put on ``PYTHONPATH`` (with ``OPENRLHF_SEARCH_CPU_SHIM=1``) to load the CPU shim in every process."""

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


@dataclass
class LaunchPlan:
    """Everything a run needs; built without side effects by :func:`build_plan`."""

    command: list[str]
    """The process to run (our entrypoint + OpenRLHF flags)."""
    env: dict[str, str]
    """Environment variables added to the current environment."""
    workdir: Path
    """Directory of the generated files."""
    prompt_file: Path
    """JSONL prompt dataset to write."""
    agent_config: AgentConfig
    """Written to :attr:`agent_file`."""
    agent_file: Path
    """JSON path of the agent config."""
    patch_config: PatchConfig
    """Written to :attr:`patch_file`."""
    patch_file: Path
    """JSON path of the patch config."""
    retrieval_url: str
    """Server the agents query."""
    server_command: list[str] | None = None
    """Retrieval server to start first (``None`` when ``openrlhf.retrieval_url`` is given)."""
    notes: list[str] = field(default_factory=list)
    """Human-readable mapping decisions (printed with ``--dry-run``)."""
    backend_config: Any = None
    """The Megatron ``BackendConfig`` (``backend: megatron``), written to :attr:`backend_file`; None = DeepSpeed."""
    backend_file: Path | None = None
    """JSON path of :attr:`backend_config` (exported as ``OPENRLHF_SEARCH_MEGATRON_CONFIG``)."""

    def render(self) -> str:
        """Shell-pastable text of the plan (``--dry-run`` output)."""
        lines = [f"# {n}" for n in self.notes]
        if self.server_command:
            lines.append("# retrieval server (started first, stopped at the end):")
            lines.append(shlex.join(self.server_command) + " &")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        flags = self.command
        lines.append(env + " \\\n  " + " \\\n  ".join(_pairs(flags)))
        return "\n".join(lines)


def _pairs(argv: list[str]) -> list[str]:
    """Group ``--flag value...`` for display."""
    out: list[str] = []
    for a in argv:
        if a.startswith("--") or not out:
            out.append(shlex.quote(a))
        else:
            out[-1] += " " + shlex.quote(a)
    return out


def _orl_config(config: Any, openrlhf: OpenRLHFConfig | dict | None) -> OpenRLHFConfig:
    """The ``openrlhf`` section: the argument when given (programmatic use), else the tree's."""
    value = openrlhf if openrlhf is not None else getattr(config, "openrlhf", None)
    if value is None:
        return OpenRLHFConfig()
    if isinstance(value, dict):
        return from_dict(OpenRLHFConfig, value, "config section 'openrlhf'")
    return value


def advantage_chain(config: Any, preset: Any) -> tuple[str, dict, list[tuple[str, dict]]]:
    """``(estimator, estimator_config, post-processor chain)`` of ``config.algorithm`` on top of ``preset``: the
    same resolution as the local trainer (:func:`openrlhf_search.trainer.local.advantage_pipeline`)."""
    from openrlhf_search.algorithms.presets import advantage_pipeline

    return advantage_pipeline(preset, config.algorithm)


def resolve_algorithm(config: Any) -> tuple[list[str], PatchConfig, list[str]]:
    """Map ``config.algorithm`` onto OpenRLHF flags and a :class:`PatchConfig`; also return explanatory notes."""
    from openrlhf_search.algorithms.presets import preset_for
    from openrlhf_search.plugins import load_plugins

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
        from openrlhf_search.algorithms.advantages import ADVANTAGE_ESTIMATORS

        ADVANTAGE_ESTIMATORS.get(estimator)  # an unknown name fails here, with "did you mean"
        flags = ["--algo.advantage.estimator", "group_norm"]
        patch.estimator, patch.estimator_config = estimator, dict(estimator_cfg)
        notes.append(f"advantage estimator {estimator}: injected from openrlhf_search (after OpenRLHF's)")
    from openrlhf_search.algorithms.losses import make_config

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


def response_budget(config: Any, orl: OpenRLHFConfig) -> int:
    """OpenRLHF's response length: ``env.max_response_tokens``, else ``env.max_total_tokens`` minus the prompt's."""
    env = config.env
    if env.max_response_tokens is not None:
        return int(env.max_response_tokens)
    budget = int(env.max_total_tokens) - orl.max_prompt_tokens
    if budget < 1:
        raise ValueError(f"env.max_total_tokens={env.max_total_tokens} leaves no response budget after "
                         f"openrlhf.max_prompt_tokens={orl.max_prompt_tokens}; set env.max_response_tokens")
    return budget


def build_flags(config: Any, orl: OpenRLHFConfig, paths: dict[str, Path]) -> tuple[list[str], PatchConfig, list[str]]:
    """OpenRLHF ``train_ppo_ray`` flags for ``config`` (see the module docstring); pure."""
    model = config.model.path
    if model in ("tiny", "smollm2") or not model:
        raise ValueError(
            f"model.path={model!r}: the OpenRLHF backend needs a Hugging Face checkpoint directory or hub id "
            "(vLLM and DeepSpeed load it by path)"
        )
    ro, opt = config.rollout, config.optimizer
    samples_per_step = ro.prompts_per_step * ro.group_size
    if samples_per_step % config.algorithm.num_minibatches:
        raise ValueError(
            f"algorithm.num_minibatches={config.algorithm.num_minibatches} must divide rollout.prompts_per_step x "
            f"rollout.group_size = {samples_per_step}"
        )
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={opt.schedule!r}: {SCHEDULES.unknown_message(opt.schedule)}")
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
    if patch.offpolicy and not orl.record_rollout_logprobs:
        raise ValueError(f"algorithm.name={config.algorithm.name!r} (+{patch.offpolicy}) needs vLLM's log-probs of "
                         "the sampled tokens: set openrlhf.record_rollout_logprobs=true")  # fmt: skip
    given = [a for a in orl.extra_args if a.split("=")[0].startswith("--algo.advantage.is_correction")]
    if patch.loss and given:
        raise ValueError(f"openrlhf.extra_args {given}: OpenRLHF's is_correction_* runs inside the PolicyLoss that "
                         f"openrlhf_search's loss patch ({patch.loss!r}) replaces; use the algorithm's +tis / +mis "
                         "modifier instead (e.g. algorithm.name=grpo+tis)")  # fmt: skip
    flags += list(orl.extra_args)
    return flags, patch, notes


def save_steps(config: Any, orl: OpenRLHFConfig) -> int:
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


BACKEND_KEYS = ("backend", "megatron", "megatron_actor")
"""Keys of a legacy ``backend`` mapping passed to :func:`build_plan` (the tree itself has ``backend`` and
``megatron``; the Megatron actor settings are derived from ``algorithm``/``rollout``)."""

MEGATRON_FROM_OPTIMIZER = {"lr": "lr", "weight_decay": "weight_decay", "clip_grad": "grad_clip"}
"""``megatron.<key>`` filled from ``optimizer.<field>`` when the ``megatron:`` section does not set it."""


def _megatron_given(config: Any, megatron: Any) -> set[str]:
    """Fields of ``config.megatron`` the user set (from the loader's origin map; for a config built in code, the
    fields that differ from the defaults)."""
    from openrlhf_search.integrations.megatron.config import MegatronTrainConfig

    origin = getattr(config, "_origin", None)
    if origin is not None:
        return {k.split(".")[1] for k in origin if k.startswith("megatron.")}
    default = MegatronTrainConfig()
    return {f.name for f in dataclasses.fields(megatron) if getattr(megatron, f.name) != getattr(default, f.name)}


def resolve_backend(config: Any, orl: OpenRLHFConfig, backend: Any = None) -> tuple[Any, list[str], list[str]]:
    """Resolve ``backend: megatron`` into a ``BackendConfig`` + extra OpenRLHF flags + notes (``(None, [], [])`` for
    DeepSpeed).

    ``backend``: None = the tree's ``backend``/``megatron`` sections; a ``BackendConfig`` (used as given); or a
    mapping of the keys ``backend``, ``megatron``, ``megatron_actor`` (programmatic use). ``megatron.lr``/
    ``weight_decay``/``clip_grad``/``adam_beta1``/``adam_beta2`` default to the ``optimizer`` section and
    ``micro_batch_size`` to ``openrlhf.micro_train_batch_size`` unless set. In every case the Megatron actor's loss,
    temperature, epochs, per-rank batch and plugins come from ``algorithm``/``rollout``/``plugins``, so the same YAML
    trains the same objective on either backend; ``algorithm.kl_coef``/``kl_estimator`` become the registry loss's
    KL term against the Megatron reference actor's log-probs.
    """
    from openrlhf_search.integrations.megatron.config import BackendConfig, MegatronTrainConfig

    given_loss = None
    if backend is None:
        if getattr(config, "backend", "deepspeed") != "megatron":
            return None, [], []
        meg = getattr(config, "megatron", None) or MegatronTrainConfig()
        given = _megatron_given(config, meg)
        bc = BackendConfig(backend="megatron", megatron=dataclasses.replace(meg))
    elif isinstance(backend, dict):
        unknown = sorted(set(backend) - set(BACKEND_KEYS))
        if unknown:
            raise ValueError(f"backend config: unknown key(s) {unknown}; valid: {list(BACKEND_KEYS)}")
        bc = BackendConfig.from_dict(backend, source="backend config")  # validates names and types
        if bc.backend != "megatron":
            return None, [], []
        given = set((backend.get("megatron") or {}).keys())
        given_loss = (backend.get("megatron_actor") or {}).get("loss")
    else:
        bc = dataclasses.replace(backend, actor=dataclasses.replace(backend.actor))
        if bc.backend != "megatron":
            return None, [], []
        given = {f.name for f in dataclasses.fields(bc.megatron)}
    if config.model.lora_rank > 0:
        raise ValueError("model.lora_rank > 0 with backend: megatron: LoRA is not implemented in the Megatron actor; "
                         "use the DeepSpeed backend (--ds.lora.*) or model.lora_rank=0")
    opt = config.optimizer
    inherited = {**{k: float(getattr(opt, src)) for k, src in MEGATRON_FROM_OPTIMIZER.items()},
                 "adam_beta1": float(opt.betas[0]), "adam_beta2": float(opt.betas[1]),
                 "micro_batch_size": orl.micro_train_batch_size}  # fmt: skip
    bc.megatron = dataclasses.replace(bc.megatron, **{k: v for k, v in inherited.items() if k not in given})
    from openrlhf_search.algorithms.presets import preset_for

    alg, ro = config.algorithm, config.rollout
    preset = preset_for(alg)
    if preset.offpolicy:
        raise ValueError(f"algorithm.name={alg.name!r}: the +{preset.offpolicy} off-policy modifier is not available "
                         "with backend: megatron (its actor does not pass vLLM's rollout log-probs to our loss); use "
                         "the DeepSpeed backend or drop the modifier")
    if orl.async_train:
        raise ValueError("openrlhf.async_train=true (--train.async_enable) is not available with backend: megatron: "
                         "the Megatron actors' weight broadcast was never run concurrently with generation and is "
                         "not versioned for staleness tags; use the DeepSpeed backend")
    if given_loss is not None and given_loss != preset.policy_loss:
        raise ValueError(f"megatron_actor.loss={given_loss!r} conflicts with algorithm.name={alg.name!r} (policy loss "
                         f"{preset.policy_loss!r}); drop megatron_actor.loss, the algorithm defines it")  # fmt: skip
    dup = bc.duplicate_actors
    world = orl.actor_num_nodes * orl.actor_num_gpus_per_node
    if world % dup:
        raise ValueError(f"megatron.parallel: TP x PP x CP = {dup} does not divide the actor's "
                         f"openrlhf.actor_num_nodes x actor_num_gpus_per_node = {world}")  # fmt: skip
    if alg.kl_coef > 0 and (orl.ref_num_nodes * orl.ref_num_gpus_per_node) % dup:
        raise ValueError(f"megatron.parallel: TP x PP x CP = {dup} does not divide the reference model's "
                         "openrlhf.ref_num_nodes x ref_num_gpus_per_node")  # fmt: skip
    from openrlhf_search.integrations.megatron.vllm_sync import check_sync_layout

    check_sync_layout(orl.colocate_all)  # NCCL refuses the colocated weight-sync group (GPU-only defect)
    if dup > 1 and orl.param_dtype != "bf16":
        raise ValueError("backend: megatron with TP x PP x CP > 1 needs openrlhf.param_dtype=bf16 (OpenRLHF's "
                         "DeepSpeed strategy asserts it whenever --ds.tensor_parallel_size > 1; Megatron's own "
                         "precision is megatron.precision)")  # fmt: skip
    dp = world // dup
    step_sequences = ro.prompts_per_step * ro.group_size // alg.num_minibatches
    micro = bc.megatron.micro_batch_size
    if step_sequences % dp or (step_sequences // dp) % micro:
        raise ValueError(f"backend: megatron: {step_sequences} sequences per optimizer step do not split into {dp} "
                         f"data-parallel ranks x megatron.micro_batch_size={micro}")  # fmt: skip
    bc.actor.loss = preset.policy_loss
    bc.actor.loss_config = {**preset.loss_cfg, **alg.loss_overrides}
    if alg.kl_coef > 0:  # OpenRLHF's KL loss lives in its DeepSpeed actor; the Megatron actor uses the loss's own term
        bc.actor.loss_config.update(kl_coef=float(alg.kl_coef), kl_estimator=alg.kl_estimator)
    from openrlhf_search.algorithms.losses import make_config

    make_config(bc.actor.loss, **bc.actor.loss_config)  # validates the loss config before anything starts
    bc.actor.temperature = float(ro.temperature)
    bc.actor.max_epochs = int(alg.ppo_epochs)
    bc.actor.plugins = list(getattr(config, "plugins", []) or [])
    bc.actor.train_batch_size = step_sequences // dp
    p = bc.megatron.parallel
    notes = [f"backend megatron: TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x CP "
             f"{p.context_parallel_size} x DP {dp}; OpenRLHF's duplicate factor --ds.tensor_parallel_size {dup}; "
             f"policy loss {bc.actor.loss} (openrlhf_search registry) in the Megatron actor; constant lr "
             f"{bc.megatron.lr} (OpenRLHF's --actor.* optimizer flags do not apply)"]  # fmt: skip
    if config.optimizer.schedule != "constant" or config.optimizer.warmup_steps:
        notes.append("backend megatron: optimizer.schedule/warmup_steps are ignored (constant learning rate)")
    if orl.packing_samples:
        notes.append("backend megatron: sample packing disabled (the Megatron actor takes padded batches)")
    return bc, ["--ds.tensor_parallel_size", str(dup)], notes


def cluster_size(orl: OpenRLHFConfig) -> tuple[int | None, int]:
    """``(nodes or None, GPUs per node)`` of the cluster: the Slurm allocation the launcher runs in, else
    ``openrlhf.cluster_nodes`` (0: unknown) and ``openrlhf.cluster_gpus_per_node``."""
    nodes, gpus = cluster_from_env()
    if nodes is not None and gpus is not None:
        return nodes, gpus
    return (orl.cluster_nodes or None), orl.cluster_gpus_per_node


def run_nodes(config: Any, orl: OpenRLHFConfig) -> int:
    """Nodes the run spans: the actor's and the reference's, and the vLLM-only ones (engines that are not colocated
    fill GPUs beyond the training groups'). One under the CPU shim (one machine)."""
    if orl.cpu_shim:
        return 1
    ref = config.algorithm.kl_coef > 0
    ref_gpus = orl.ref_num_nodes * orl.ref_num_gpus_per_node if ref else 0
    total = gpus_needed(orl.actor_num_nodes * orl.actor_num_gpus_per_node, ref_gpus,
                        orl.vllm_num_engines * orl.vllm_tensor_parallel_size, orl.colocate_all, False, orl.async_train)
    return max(orl.actor_num_nodes, orl.ref_num_nodes if ref else 1, nodes_spanned(total, cluster_size(orl)[1]))


def build_plan(config: Any, openrlhf: OpenRLHFConfig | dict | None = None, backend: Any = None) -> LaunchPlan:
    """Translate ``config`` into a :class:`LaunchPlan` without touching the file system or network.

    ``backend``: the training backend selection (see :func:`resolve_backend`); None = OpenRLHF's DeepSpeed actors.
    """
    from openrlhf_search.plugins import load_plugins

    load_plugins(getattr(config, "plugins", None), source="plugins")  # the driver resolves names too
    orl = _orl_config(config, openrlhf).validate()
    backend_config, backend_flags, backend_notes = resolve_backend(config, orl, backend)
    if backend_config is not None and orl.packing_samples:
        orl = dataclasses.replace(orl, packing_samples=False)
    if backend_config is not None and orl.vllm_enable_prefix_caching:
        # OpenRLHF's DeepSpeed actor resets vLLM's prefix cache before each weight sync; the Megatron actor's
        # broadcast_to_vllm does not, so cached KV blocks of the old weights would be reused after a sync.
        orl = dataclasses.replace(orl, vllm_enable_prefix_caching=False)
        backend_notes = [*backend_notes, "backend megatron: vLLM prefix caching off (its weight sync does not reset "
                         "the prefix cache)"]  # fmt: skip
    if backend_config is not None and orl.resume:
        raise ValueError("openrlhf.resume / --resume: not available with backend: megatron (its checkpoints are HF "
                         "weights only, without optimizer or dataloader state, and OpenRLHF would silently start "
                         "over); restart from a saved <ckpt>/global_step<N>_hf directory as model.path instead")
    if orl.packing_samples and "flash_attention" not in orl.attn_implementation:
        raise ValueError(f"openrlhf.packing_samples=true with openrlhf.attn_implementation="
                         f"{orl.attn_implementation!r}: OpenRLHF 0.11.2 then silently switches to flash_attention_2; "
                         "set packing_samples=false or a flash_attention implementation")  # fmt: skip
    nodes = run_nodes(config, orl)
    if nodes > 1 and not orl.shared_dir:
        raise ValueError(f"a {nodes}-node run needs openrlhf.shared_dir: OpenRLHF's trainer actor reads the prompt "
                         "dataset and the actor ranks write checkpoints on whichever node Ray places them; set it "
                         "to a directory mounted at the same path on every node")  # fmt: skip
    output = Path(orl.shared_dir or Path(config.logging.output_dir) / "openrlhf").resolve()
    workdir = Path(orl.workdir).resolve() if orl.workdir else output
    paths = {"agent_py": AGENT_FILE, "prompts": workdir / "prompts.jsonl", "output": output}
    flags, patch, notes = build_flags(config, orl, paths)
    if backend_config is not None:
        extra = list(orl.extra_args)
        flags = flags[: len(flags) - len(extra)] + backend_flags + extra  # extra_args still win
        patch.loss, patch.loss_config = "", {}  # the Megatron actor runs the registry loss itself
        notes = [n for n in notes if not n.startswith("loss ")] + backend_notes
    server_command = None
    retrieval_url = orl.retrieval_url
    if not retrieval_url:
        if not config.retriever.spec or config.retriever.spec.startswith("http"):
            retrieval_url = config.retriever.spec
        else:
            retrieval_url = f"http://{orl.retrieval_host}:{orl.retrieval_port}"
            server_command = [orl.python or sys.executable, "-m", "openrlhf_search", "serve",
                              "--index", config.retriever.spec,
                              "--host", orl.retrieval_host, "--port", str(orl.retrieval_port)]  # fmt: skip
    if not retrieval_url:
        raise ValueError("retriever.spec is empty and openrlhf.retrieval_url is unset: the agent needs a retriever")
    host = urllib.parse.urlsplit(retrieval_url).hostname or ""
    if host in ("0.0.0.0", "::"):
        raise ValueError(f"retriever at {retrieval_url}: {host} is an address to listen on, not one to connect to "
                         "(the agents would call themselves); give the server's own address, e.g. the head node's")
    if nodes > 1 and (host in ("localhost", "::1") or host.startswith("127.")):
        where = "openrlhf.retrieval_host" if server_command else "the retriever URL"
        raise ValueError(f"retriever at {retrieval_url} on a {nodes}-node run: the agents in the vLLM engines on the "
                         f"other nodes cannot reach a loopback address; set {where} to the head node's address")
    from openrlhf_search.algorithms.postprocess import needs_records

    agent = agent_config_from_tree(config, retrieval_url, record_logprobs=orl.record_rollout_logprobs,
                                   calib_records=needs_records(patch.chain()),
                                   rollout_dir=str(paths["output"] / "rollouts"))  # fmt: skip
    agent_file, patch_file = workdir / "agent.json", workdir / "patch.json"
    env = {AGENT_CONFIG_ENV: str(agent_file), PATCH_CONFIG_ENV: str(patch_file),
           SHARED_FILES_ENV: str(paths["prompts"])}  # fmt: skip
    backend_file = None
    if backend_config is not None:
        from openrlhf_search.integrations.megatron.config import MEGATRON_CONFIG_ENV

        backend_file = workdir / "megatron.json"
        env[MEGATRON_CONFIG_ENV] = str(backend_file)
    if orl.ray_address:
        env["RAY_ADDRESS"] = orl.ray_address
    if orl.cpu_shim:
        env.update(cpu_shim_env())
        if backend_config is not None:
            from openrlhf_search.integrations.megatron.cpu_shim import ENV_SWITCH

            env[ENV_SWITCH] = "1"
    command = [orl.python or sys.executable, "-m", "openrlhf_search.integrations.openrlhf.entrypoint", *flags]
    return LaunchPlan(command=command, env=env, workdir=workdir, prompt_file=paths["prompts"], agent_config=agent,
                      agent_file=agent_file, patch_config=patch, patch_file=patch_file, retrieval_url=retrieval_url,
                      server_command=server_command, notes=notes, backend_config=backend_config,
                      backend_file=backend_file)  # fmt: skip


def cpu_shim_env(base_pythonpath: str | None = None) -> dict[str, str]:
    """Environment that loads :mod:`.cpu_shim` in every process of a CPU-only run (see docs/openrlhf.md)."""
    pythonpath = os.environ.get("PYTHONPATH", "") if base_pythonpath is None else base_pythonpath
    return {
        CPU_SHIM_ENV: "1",
        "PYTHONPATH": str(SITECUSTOMIZE_DIR) + (os.pathsep + pythonpath if pythonpath else ""),
        "DS_ACCELERATOR": "cpu",
        "GLOO_SOCKET_IFNAME": "lo",
        "VLLM_HOST_IP": "127.0.0.1",
    }


def load_train_samples(data_cfg: Any) -> list:
    """Training questions (``QASample``): the synthetic KB's train split or the given files, capped at
    ``data.num_train`` (set it large for real datasets)."""
    if data_cfg.source == "synthetic":
        from openrlhf_search.data.synthetic import generate_kb

        return generate_kb(seed=data_cfg.seed, n_entities=data_cfg.num_entities).train[: data_cfg.num_train]
    if not data_cfg.train_files:
        raise ValueError(f"data.source={data_cfg.source!r} needs data.train_files")
    from openrlhf_search.data.formats import read_dataset

    return [s for path in data_cfg.train_files for s in read_dataset(path)][: data_cfg.num_train]


def write_prompt_dataset(samples: list, path: Path, n_rows: int, template_name: str, tokenizer, seed: int,
                         tools: list[str] | None = None) -> Path:
    """Write ``n_rows`` prompts (epochs of seeded permutations of ``samples``) as OpenRLHF JSONL (rendered with the
    template the agent's episode uses for ``tools``)."""
    from openrlhf_search.env.episode import EnvConfig
    from openrlhf_search.env.templates import env_template

    if not samples:
        raise ValueError("no training questions")
    template = env_template(template_name, EnvConfig(tools=list(tools or ["search"])))
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_rows:
        perm = list(range(len(samples)))
        rng.shuffle(perm)
        order.extend(perm)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in order[:n_rows]:
            s = samples[i]
            label = json.dumps({"question": s.question, "golden_answers": list(s.golden_answers)})
            f.write(json.dumps({"input": template.render(s.question, tokenizer), "label": label}) + "\n")
    return path


def check_tokenizer_reloads(model_path: str, tokenizer, prompt_file: Path, sample: int = 64) -> None:
    """Refuse a checkpoint whose ``AutoTokenizer`` (what OpenRLHF's actors and vLLM load) tokenizes its prompts
    differently from the tokenizer it was saved with (``trainer.models.load_tokenizer``): e.g. a tiny-model run's
    locally trained BPE under a ``qwen2`` config, which transformers 5 rebuilds as ``Qwen2Tokenizer``. Compared on
    the first ``sample`` rendered prompts, by token ids (a backend that differs only in unused settings passes)."""
    from openrlhf_search.trainer.models import load_tokenizer

    if not (Path(model_path) / "tokenizer.json").is_file():
        return
    try:
        exact = load_tokenizer(model_path)
    except (OSError, RuntimeError, ValueError):  # nothing to compare against
        return
    with open(prompt_file, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line_no > sample:
                break
            text = json.loads(line)["input"]
            if tokenizer.encode(text, add_special_tokens=False) != exact.encode(text, add_special_tokens=False):
                raise ValueError(f"model.path={model_path}: AutoTokenizer (used by OpenRLHF's actors and vLLM) "
                                 f"tokenizes prompt {line_no} of {prompt_file} differently from the tokenizer this "
                                 "checkpoint was saved with; train it locally, or use a checkpoint whose "
                                 "config.json names its own tokenizer class")  # fmt: skip


def materialize(plan: LaunchPlan, config: Any) -> None:
    """Write the prompt dataset and the agent/patch JSON files of ``plan``."""
    from transformers import AutoTokenizer

    # OpenRLHF's actors and vLLM load the tokenizer with AutoTokenizer too: render the prompts with exactly that one.
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    n_rows = config.steps * config.rollout.prompts_per_step
    write_prompt_dataset(load_train_samples(config.data), plan.prompt_file, n_rows, config.env.template, tokenizer,
                         config.seed, tools=list(config.env.tools))  # fmt: skip
    check_tokenizer_reloads(config.model.path, tokenizer, plan.prompt_file)
    to_json_file(plan.agent_config, plan.agent_file)
    to_json_file(plan.patch_config, plan.patch_file)
    if plan.backend_config is not None and plan.backend_file is not None:
        plan.backend_config.to_json_file(str(plan.backend_file))


def wait_for_health(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``<url>/health`` until it answers 200; raise ``RuntimeError`` naming the URL on timeout or exit."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"retrieval server exited with code {proc.returncode} before {url}/health answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"retrieval server at {url} did not answer /health within {timeout:.0f} s")


def check_cluster_inputs(config: Any, plan: LaunchPlan, orl: OpenRLHFConfig) -> None:
    """Refuse, before anything starts (``--dry-run`` too), the launches that cannot work or would silently train on
    the wrong thing: a Megatron run on a model that is not a local directory (mbridge loads HF weights from disk;
    a hub id is not downloaded), and a GPU run on the synthetic toy KB unless ``openrlhf.allow_toy_data``."""
    model = str(config.model.path)
    if plan.backend_config is not None and not Path(model).is_dir():
        raise ValueError(f"model.path={model!r} is not a local directory: the Megatron backend loads the HF weights "
                         "from disk (mbridge) and does not download hub ids; fetch it first (e.g. `huggingface-cli "
                         "download <id> --local-dir DIR`, on storage every node sees) and pass DIR")  # fmt: skip
    if config.data.source == "synthetic" and not orl.cpu_shim and not orl.allow_toy_data:
        raise ValueError("data.source='synthetic' (the toy KB, the default when the config has no data: section) on "
                         "a GPU run: give a data: section (e.g. Search-R1's train files) and a retriever, or set "
                         "openrlhf.allow_toy_data=true if the toy run is intended")  # fmt: skip
    problems = cluster_problems(config, plan, orl)
    if problems:
        raise ValueError(" | ".join(problems))


def cluster_problems(config: Any, plan: LaunchPlan, orl: OpenRLHFConfig) -> list[str]:
    """What DeepSpeed, Ray's placement groups and vLLM would refuse in ``plan``'s command
    (:func:`.cluster.check_command`: batch arithmetic, colocation, TP vs the model's heads when ``model.path`` is a
    local directory, the GPU count vs the cluster of :func:`cluster_size` when its node count is known)."""
    heads, kv_heads = model_heads(str(config.model.path))
    nodes, gpus_per_node = cluster_size(orl)
    par = plan.backend_config.megatron.parallel if plan.backend_config is not None else None
    return check_command(plan.command[3:], backend="megatron" if par is not None else "deepspeed",
                         megatron_tp=par.tensor_model_parallel_size if par else 1,
                         megatron_pp=par.pipeline_model_parallel_size if par else 1,
                         megatron_cp=par.context_parallel_size if par else 1, heads=heads, kv_heads=kv_heads,
                         cluster_nodes=nodes, cluster_gpus_per_node=gpus_per_node)  # fmt: skip


def checkpoint_dir(plan: LaunchPlan) -> Path:
    """The DeepSpeed actor checkpoint OpenRLHF resumes from (``<--ckpt.path>/_actor``)."""
    return Path(plan.command[plan.command.index("--ckpt.path") + 1]) / "_actor"


def run_openrlhf(config: Any, dry_run: bool = False, openrlhf: OpenRLHFConfig | dict | None = None,
                 backend: Any = None, require_checkpoint: bool = False) -> int:  # fmt: skip
    """Run (or with ``dry_run`` print) the OpenRLHF training described by ``config``; return the exit code.

    ``require_checkpoint`` (``--resume``): refuse to start when the run has no checkpoint yet (``--resume-or-start``
    and ``openrlhf.resume`` alone start fresh then, as OpenRLHF does)."""
    try:
        plan = build_plan(config, openrlhf, backend)
        check_cluster_inputs(config, plan, _orl_config(config, openrlhf))
        if require_checkpoint and not dry_run and not checkpoint_dir(plan).is_dir():
            raise ValueError(f"--resume: no checkpoint at {checkpoint_dir(plan)} (use --resume-or-start to start "
                             "fresh when there is none)")  # fmt: skip
    except (ValueError, KeyError) as exc:
        print(f"openrlhf-search train --backend openrlhf: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        print(plan.render())
        return 0
    materialize(plan, config)
    env = {**os.environ, **plan.env}
    server = None
    try:
        if plan.server_command:
            server = subprocess.Popen(plan.server_command, env=env)
            wait_for_health(plan.retrieval_url, proc=server)
        else:
            wait_for_health(plan.retrieval_url, timeout=30.0)
        return subprocess.call(plan.command, env=env)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def plan_as_dict(plan: LaunchPlan) -> dict:
    """JSON-friendly view of a plan (for logs and tests)."""
    out = dataclasses.asdict(plan)
    return json.loads(json.dumps(out, default=str))


def load_configs(path: str | None, overrides: list[str]) -> tuple[Any, OpenRLHFConfig]:
    """``(TrainConfig, its openrlhf section)`` from :func:`openrlhf_search.trainer.config.load_config`: the one loader
    (every section, ``openrlhf.*``, ``backend`` and ``megatron.*`` included, is typed, overridable and checked)."""
    from openrlhf_search.trainer.config import load_config

    cfg = load_config(path, overrides)
    return cfg, cfg.openrlhf


def main(argv: list[str] | None = None) -> int:
    """``python -m openrlhf_search.integrations.openrlhf.launch --config F [--dry-run] [key=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m openrlhf_search.integrations.openrlhf.launch",
                                     description="Train a search agent with OpenRLHF (Ray + vLLM + DeepSpeed).")
    parser.add_argument("--config", default=None, help="YAML training config (optional 'openrlhf:' section)")
    parser.add_argument("--dry-run", action="store_true", help="print the environment and command, run nothing")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="resume from the run's latest checkpoint "
                       "(openrlhf.resume; an error when there is none)")
    start.add_argument("--resume-or-start", action="store_true", help="resume when the run has a checkpoint, "
                       "else start fresh (requeued jobs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (openrlhf.<field>=... for the cluster, "
                        "backend=megatron and megatron.<field>=... for the Megatron backend)")
    args = parser.parse_args(argv)
    from openrlhf_search.trainer.validate import load_and_validate

    cfg = load_and_validate(args.config, args.overrides, backend="openrlhf", prog="openrlhf launch",
                            check_files=not args.dry_run)  # a dry run may be planned before the data exists
    if cfg is None:
        return 2
    if args.resume or args.resume_or_start:  # OpenRLHF's --ckpt.load_enable
        cfg.openrlhf = dataclasses.replace(cfg.openrlhf, resume=True)
    return run_openrlhf(cfg, dry_run=args.dry_run, require_checkpoint=args.resume)


if __name__ == "__main__":
    sys.exit(main())
