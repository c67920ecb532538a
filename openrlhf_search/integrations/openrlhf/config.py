"""Typed configuration of the OpenRLHF backend, and how it travels into OpenRLHF's Ray processes.

Three dataclasses, three audiences:

* :class:`OpenRLHFConfig` -- the ``openrlhf:`` section of the one config tree
  (:class:`~openrlhf_search.trainer.config.TrainConfig`): GPUs per role, vLLM engines, DeepSpeed ZeRO stage, the
  retrieval server. Loaded, type-checked and overridden (``openrlhf.<field>=...``) like every other section.
* :class:`AgentConfig` -- what the search agent needs inside *every* vLLM rollout actor: a derived view of the tree,
  built only by :func:`agent_config_from_tree`. OpenRLHF builds the agent executor with no arguments, so the launcher
  writes it as JSON and points :data:`AGENT_CONFIG_ENV` at the file.
* :class:`PatchConfig` -- which of our losses / advantage estimators / post-processors replace OpenRLHF's inside its
  training actors (a view built by the launcher's ``resolve_algorithm``); same transport through
  :data:`PATCH_CONFIG_ENV`.

Both views carry the tree's ``plugins`` list: each process imports those modules before it resolves a name.

Nothing here imports OpenRLHF, Ray or torch: the launcher's dry run and its tests stay light.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openrlhf_search.config import build_typed, section
from openrlhf_search.env.config import EnvConfig
from openrlhf_search.retrieval.replicas import parse_replicas

AGENT_CONFIG_ENV = "OPENRLHF_SEARCH_AGENT_CONFIG"
"""Environment variable holding the path of the :class:`AgentConfig` JSON file (read in the vLLM actors)."""
PATCH_CONFIG_ENV = "OPENRLHF_SEARCH_PATCH_CONFIG"
"""Environment variable holding the path of the :class:`PatchConfig` JSON file (read in the training actors)."""
SHARED_FILES_ENV = "OPENRLHF_SEARCH_SHARED_FILES"
"""Paths (``os.pathsep``-separated) the entrypoint checks on every Ray node before training starts (the prompt
dataset): a multi-node run fails there, naming the node, when ``openrlhf.shared_dir`` is not shared."""


@section("openrlhf")
@dataclass
class OpenRLHFConfig:
    """Resources and engine settings of an OpenRLHF run (the YAML section ``openrlhf:``).

    Defaults describe one 8-GPU node with colocated actor and vLLM (hybrid engine). GPU settings are written for
    GPUs and are not verified on this project's CPU CI (see docs/openrlhf.md).
    """

    strategy: Literal["deepspeed", "megatron"] = "deepspeed"
    """Training actors: OpenRLHF's own DeepSpeed ones, or this package's Megatron ones (the ``megatron`` backend;
    older configs wrote ``backend: deepspeed|megatron``)."""
    actor_num_nodes: int = 1
    """Nodes running policy (actor) ranks."""
    actor_num_gpus_per_node: int = 8
    """GPUs per node for the actor (data-parallel ranks = nodes x GPUs)."""
    ref_num_nodes: int = 1
    """Nodes for the frozen reference model (only created when ``algorithm.kl_coef > 0``)."""
    ref_num_gpus_per_node: int = 8
    """GPUs per node for the reference model."""
    vllm_num_engines: int = 8
    """vLLM rollout engines (each runs our search agent executor)."""
    vllm_tensor_parallel_size: int = 1
    """Tensor parallelism inside one vLLM engine (use 2 for 14B on 80 GB cards if memory is short)."""
    vllm_gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take (lower it when colocated with training)."""
    vllm_sync_backend: str = "nccl"
    """Weight-sync backend from DeepSpeed rank 0 to the engines: ``nccl`` on GPUs, ``gloo`` on CPU."""
    vllm_enable_sleep: bool = True
    """Let vLLM release its memory while the actor trains (needed with ``colocate_all``)."""
    vllm_enforce_eager: bool = False
    """Disable CUDA graphs in vLLM (debugging; the CPU path forces it)."""
    colocate_all: bool = True
    """Put actor, reference and vLLM on the same GPUs (hybrid engine)."""
    cluster_nodes: int = 0
    """Nodes of the Ray cluster the run goes to (0: unknown; inside a Slurm job its allocation is used). When known,
    a layout needing more GPUs than ``cluster_nodes x cluster_gpus_per_node`` is refused at launch instead of
    waiting forever for its placement groups."""
    cluster_gpus_per_node: int = 8
    """GPUs of one cluster node (inside a Slurm job its allocation is used): the multi-node checks count the nodes a
    layout spans with it, vLLM-only nodes included."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (3 for 14B+)."""
    param_dtype: str = "bf16"
    """Training parameter dtype (``bf16`` or ``fp16``)."""
    attn_implementation: str = "flash_attention_2"
    """HF attention kernel in training (``sdpa`` or ``eager`` without flash-attn, e.g. on CPU)."""
    gradient_checkpointing: bool = True
    """Activation checkpointing in the actor."""
    adam_offload: bool = False
    """Offload Adam states to CPU memory (saves GPU memory on 14B)."""
    packing_samples: bool = True
    """Pack sequences without padding (needs flash-attn; disable on CPU)."""
    micro_train_batch_size: int = 4
    """Sequences per actor forward/backward micro-batch."""
    micro_rollout_batch_size: int = 8
    """Sequences per experience-making forward micro-batch."""
    max_prompt_tokens: int = 512
    """Token budget reserved for the rendered prompt; OpenRLHF's ``--data.max_len`` = this + the response budget."""
    ray_address: str = ""
    """Ray cluster to join (``RAY_ADDRESS``); empty = OpenRLHF starts a local Ray instance."""
    retrieval_url: str = ""
    """URL of a running retrieval server (``http://host:port``). Empty: the launcher starts
    ``openrlhf-search serve`` on ``retriever.spec`` (an index directory) and stops it afterwards."""
    retrieval_host: str = "127.0.0.1"
    """Host the launcher binds a retrieval server it starts (use the node's IP for multi-node runs)."""
    retrieval_port: int = 8000
    """Port of a retrieval server the launcher starts."""
    retrieval_replicas: str = "0"
    """How the launcher serves ``retriever.spec`` (an index directory at the same path on every node, e.g. under
    ``shared_dir``): ``0`` -- one ``openrlhf-search serve`` process on ``retrieval_host:retrieval_port``;
    ``per_node`` -- one replica as a Ray actor on every node of the cluster; ``N`` -- N replica actors spread over
    the nodes. The agents spread their searches over the replicas and move a failed request to another one
    (``retrieval/failover`` in the logs; docs/retrieval.md)."""
    retrieval_replica_cpus: float = 1.0
    """CPUs Ray reserves for each retrieval replica."""
    retrieval_replica_gpus: float = 0.0
    """GPUs Ray reserves for each retrieval replica (a dense index on the GPU; 0: CPU)."""
    workdir: str = ""
    """Where the launcher writes the prompt dataset and the agent/patch JSON files (default
    ``<logging.output_dir>/openrlhf``)."""
    save_steps: int = -1
    """Checkpoint (DeepSpeed states + dataloader position, ``--ckpt.save_steps``) every N steps; -1 = take
    ``logging.save_every`` when it is > 0, else only the final HF model (``--ckpt.output_dir``)."""
    save_hf: bool = True
    """Also write an HF checkpoint (``<ckpt>/global_step<N>_hf``, ``--ckpt.save_hf``) at every checkpoint step."""
    resume: bool = False
    """Resume from the latest checkpoint under the run's checkpoint directory (``--ckpt.load_enable``; also
    ``openrlhf-search train --backend openrlhf --resume``). A run with no checkpoint yet starts from scratch, so a
    requeued job can always pass it."""
    shared_dir: str = ""
    """Directory mounted at the same path on every node (a shared filesystem). OpenRLHF's trainer actor reads the
    prompt dataset and the actor ranks write checkpoints on whichever node Ray places them, so a multi-node run
    (``actor_num_nodes`` or ``ref_num_nodes`` > 1) refuses to start without it; when set, the prompt dataset and the
    agent/patch files, checkpoints and final model go under it (use one per run) instead of
    ``<logging.output_dir>/openrlhf``."""
    vllm_enable_prefix_caching: bool = True
    """vLLM automatic prefix caching (``--vllm.enable_prefix_caching``, off in OpenRLHF by default): every agent
    turn re-sends the whole history, which the cache then does not re-prefill."""
    record_rollout_logprobs: bool = True
    """Ask vLLM for the sampled tokens' log-probs on every turn (diagnostics: rollout/trainer mismatch)."""
    async_train: bool = False
    """Asynchronous training (``--train.async_enable``): OpenRLHF's ``PPOTrainerAsync`` samples the next batch
    while the actor trains on the current one, so samples are up to ``async_queue_size`` versions stale (logged as
    ``async/staleness``; ``+tis``/``+mis`` correct for it). Needs ``vllm_enable_sleep=false`` or
    ``colocate_all=false`` (OpenRLHF refuses vLLM sleep in async mode)."""
    async_queue_size: int = 1
    """Batches the generator may run ahead of the trainer (``--train.async_queue_size``)."""
    partial_rollout: bool = False
    """With :attr:`async_train`: weight syncs pause vLLM instead of waiting for the running batch to finish
    (``--train.partial_rollout_enable``); in-flight trajectories continue under the new weights, so one trajectory
    can mix versions (``async/mixed_version_share``)."""
    python: str = ""
    """Python interpreter that has OpenRLHF installed (default: the current one)."""
    extra_args: list[str] = field(default_factory=list)
    """Extra OpenRLHF flags appended verbatim (they win over generated ones, e.g. ``--vllm.enforce_eager``)."""

    def problems(self) -> list[str]:
        """Every value out of range, one line each naming the field (``[]`` if none)."""
        problems = []
        for name in ("actor_num_nodes", "actor_num_gpus_per_node", "vllm_num_engines", "vllm_tensor_parallel_size",
                     "micro_train_batch_size", "micro_rollout_batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"openrlhf.{name}={getattr(self, name)} (expected >= 1)")
        if self.vllm_sync_backend not in ("nccl", "gloo"):
            problems.append(f"openrlhf.vllm_sync_backend={self.vllm_sync_backend!r} (expected 'nccl' or 'gloo')")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"openrlhf.zero_stage={self.zero_stage} (expected 0-3)")
        if self.param_dtype not in ("bf16", "fp16"):
            problems.append(f"openrlhf.param_dtype={self.param_dtype!r} (expected 'bf16' or 'fp16')")
        if self.async_queue_size < 1:
            problems.append(f"openrlhf.async_queue_size={self.async_queue_size} (expected >= 1)")
        if self.partial_rollout and not self.async_train:
            problems.append("openrlhf.partial_rollout=true needs openrlhf.async_train=true")
        if self.async_train and self.colocate_all and self.vllm_enable_sleep:
            problems.append("openrlhf.async_train=true with colocate_all=true and vllm_enable_sleep=true (OpenRLHF "
                            "0.11.2 refuses vLLM sleep mode in async training: set vllm_enable_sleep=false)")
        try:
            parse_replicas(self.retrieval_replicas)
        except ValueError as exc:
            problems.append(str(exc))
        for name in ("retrieval_replica_cpus", "retrieval_replica_gpus"):
            if getattr(self, name) < 0:
                problems.append(f"openrlhf.{name}={getattr(self, name)} (expected >= 0)")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            problems.append(f"openrlhf.vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} (0 < x <= 1)")
        return problems

    def validate(self) -> OpenRLHFConfig:
        """Raise ``ValueError`` naming every field out of range; return ``self``."""
        problems = self.problems()
        if problems:
            raise ValueError("invalid OpenRLHF config: " + "; ".join(problems))
        return self


@dataclass
class AgentConfig:
    """Everything the search agent executor needs inside a vLLM rollout actor (serialised to JSON).

    A view of the one config tree (:func:`agent_config_from_tree`). The environment is the tree's ``env`` section
    embedded whole (the same :class:`~openrlhf_search.env.config.EnvConfig` the local trainer builds its environment
    from), so the agent and the local environment run with identical limits.
    """

    retrieval_url: str
    """Retrieval server URL (``http://host:port``; several, comma-separated: replicas) reached through
    ``HTTPRetriever`` (an index directory also works, in-process: tests only, every vLLM actor would load its own
    copy). Unused when :attr:`retrieval_replicas` is set."""
    retrieval_replicas: str = ""
    """Name of the Ray directory actor of the retrieval replicas the entrypoint started
    (:mod:`openrlhf_search.retrieval.replicas`); the agent asks it for their URLs. Empty: use :attr:`retrieval_url`."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The tree's ``env`` section, as is: template, reward, tools and the episode's limits."""
    record_logprobs: bool = True
    """Request vLLM log-probs of sampled tokens on every turn."""
    calib_records: bool = False
    """Publish per-turn CalibAdv records to the trainer (set when a post-processor needs them, e.g. CalibAdv)."""
    request_timeout: float = 60.0
    """Seconds before a retrieval request fails (``retriever.timeout``)."""
    plugins: list[str] = field(default_factory=list)
    """The tree's ``plugins``: imported in the vLLM actor before the template, reward and tools are resolved."""
    rollout_dir: str = ""
    """Directory for viewer records (``<dir>/agent_<pid>.jsonl``, :mod:`openrlhf_search.viewer.records`); empty =
    none. The launcher sets ``<output>/rollouts`` when ``logging.rollout_every > 0``."""
    rollout_every: int = 10
    """Write every N-th finished episode of this vLLM actor (``logging.rollout_every``: the same sampling knob as
    the local trainer's, here per episode since the agent does not see RL steps)."""

    def search_env_config(self) -> EnvConfig:
        """The environment's :class:`~openrlhf_search.env.config.EnvConfig` (the tree's ``env`` section)."""
        return self.env


def agent_config_from_tree(cfg: Any, retrieval_url: str, record_logprobs: bool = True,
                           calib_records: bool = False, rollout_dir: str = "",
                           retrieval_replicas: str = "") -> AgentConfig:
    """The :class:`AgentConfig` view of a :class:`~openrlhf_search.trainer.config.TrainConfig` (the only builder):
    the ``env`` section embedded whole, so every environment field reaches the agent."""
    return AgentConfig(retrieval_url=retrieval_url, retrieval_replicas=retrieval_replicas,
                       env=dataclasses.replace(cfg.env), record_logprobs=record_logprobs,
                       calib_records=calib_records, request_timeout=float(cfg.retriever.timeout),
                       plugins=list(cfg.plugins), rollout_dir=rollout_dir if cfg.logging.rollout_every else "",
                       rollout_every=max(1, int(cfg.logging.rollout_every)))  # fmt: skip


@dataclass
class PatchConfig:
    """What :mod:`.patches` replaces inside OpenRLHF's actors (serialised to JSON)."""

    loss: str = ""
    """Name of our policy loss (``get_policy_loss``) used instead of OpenRLHF's; empty = keep OpenRLHF's."""
    loss_config: dict[str, Any] = field(default_factory=dict)
    """Config of that loss (``PolicyLossConfig`` fields)."""
    offpolicy: str = ""
    """``"tis"`` / ``"mis"``: wrap :attr:`loss` with that off-policy correction
    (:func:`openrlhf_search.algorithms.offpolicy.with_offpolicy_correction`), behaviour log-probs = OpenRLHF's
    ``rollout_log_probs`` (vLLM's); empty = none."""
    offpolicy_config: dict[str, Any] = field(default_factory=dict)
    """Fields of ``OffPolicyConfig`` other than ``mode`` (``level``, ``tis_cap``, ``mis_low``, ``mis_high``)."""
    calibadv: bool = False
    """Apply ``calibrate_advantages`` after OpenRLHF computed the advantages."""
    calibadv_config: dict[str, Any] = field(default_factory=dict)
    """Config of ``CalibAdvConfig`` (e.g. ``target_ratio``, the paper's lambda); used when :attr:`postprocessors`
    is empty and :attr:`calibadv` is set (older patch files)."""
    estimator: str = ""
    """Our advantage estimator (registry name) recomputing the outcome advantages from the rewards after
    OpenRLHF's own computation; empty = keep OpenRLHF's (a native estimator computing the same thing)."""
    estimator_config: dict[str, Any] = field(default_factory=dict)
    """Keyword config of :attr:`estimator`."""
    postprocessors: list[list[Any]] = field(default_factory=list)
    """Advantage post-processor chain ``[[name, config], ...]`` (``openrlhf_search.algorithms.postprocess``), run on
    OpenRLHF's experiences after the advantages (CalibAdv is ``["calibadv", {...}]``)."""
    plugins: list[str] = field(default_factory=list)
    """The tree's ``plugins``: imported in the driver and in every patched actor before a name is resolved."""
    dump_dir: str = ""
    """If set, every step's experiences (tokens, action mask, advantages, trainer and vLLM log-probs) are written
    to ``<dump_dir>/step_<n>.pt`` after the advantages are computed (debugging; the end-to-end test reads them)."""

    @property
    def active(self) -> bool:
        """True when anything is patched."""
        return bool(self.loss) or self.advantages_patched or bool(self.dump_dir)

    @property
    def advantages_patched(self) -> bool:
        """True when the experience maker's advantages are recomputed or post-processed."""
        return bool(self.estimator) or bool(self.postprocessors) or self.calibadv

    def chain(self) -> list[tuple[str, dict]]:
        """The post-processor chain as ``[(name, config)]`` (CalibAdv from :attr:`calibadv` for older files)."""
        if self.postprocessors:
            return [(str(n), dict(c or {})) for n, c in self.postprocessors]
        return [("calibadv", dict(self.calibadv_config))] if self.calibadv else []


def to_json_file(obj: Any, path: str | Path) -> Path:
    """Write a config dataclass as JSON to ``path`` (parents created); return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(dataclasses.asdict(obj), indent=2, sort_keys=True), encoding="utf-8")
    return p


def from_json_file(cls: type, path: str | Path) -> Any:
    """Read a config dataclass ``cls`` from JSON; unknown keys raise ``ValueError`` naming the file and key."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{cls.__name__} file not found: {p}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}:{exc.lineno}: invalid JSON for {cls.__name__}: {exc.msg}") from exc
    return from_dict(cls, data, str(p))


def from_dict(cls: type, data: dict, source: str) -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys (the message names ``source`` and the key)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} key(s) {unknown}; valid: {sorted(valid)}")
    return build_typed(cls, data, source)  # types checked ('1e-6' -> 1e-06 where a float belongs)


def from_env(cls: type, env_var: str) -> Any:
    """Load ``cls`` from environment variable ``env_var``: a JSON file path, or inline JSON (starts with ``{``; the
    entrypoint forwards configs inline through Ray's runtime environment so multi-node runs need no shared disk)."""
    path = os.environ.get(env_var, "")
    if path.lstrip().startswith("{"):
        try:
            return from_dict(cls, json.loads(path), f"${env_var}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"${env_var}: invalid inline JSON for {cls.__name__}: {exc.msg}") from exc
    if not path:
        raise RuntimeError(
            f"{env_var} is not set: it must name the {cls.__name__} JSON file written by "
            "`openrlhf-search train --backend openrlhf` (see docs/openrlhf.md)"
        )
    return from_json_file(cls, path)
