"""The OpenRLHF backend's plan: every check a launch needs, then the command, its environment and its files.

:func:`plan_problems` lists every problem of a config for this backend at once (the ``openrlhf`` section, the
algorithm's mapping, the Megatron strategy's layout, the cluster inputs); :func:`build_plan` turns a config without
problems into a :class:`LaunchPlan` (``python -m openrlhf_search.integrations.openrlhf.entrypoint <flags>`` with its
environment, the agent/patch/Megatron configs and the retrieval server to start) without side effects.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openrlhf_search.algorithms.losses import make_config
from openrlhf_search.algorithms.postprocess import needs_records
from openrlhf_search.algorithms.presets import preset_for
from openrlhf_search.integrations.megatron.config import MEGATRON_CONFIG_ENV, MegatronActorConfig, MegatronTrainConfig
from openrlhf_search.integrations.megatron.vllm_sync import check_sync_layout
from openrlhf_search.plugins import load_plugins
from openrlhf_search.retrieval.client import parse_urls
from openrlhf_search.retrieval.replicas import REPLICAS_ENV, ReplicaSpec, parse_replicas
from openrlhf_search.trainer.config import TrainConfig

from .cluster import check_command, cluster_from_env, gpus_needed, model_heads, nodes_spanned
from .config import (
    AGENT_CONFIG_ENV,
    PATCH_CONFIG_ENV,
    SHARED_FILES_ENV,
    AgentConfig,
    OpenRLHFConfig,
    PatchConfig,
    agent_config_from_tree,
    from_dict,
)
from .flags import AGENT_FILE, build_flags, flag_problems


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
    """Retrieval server to start first (``None`` when ``openrlhf.retrieval_url`` is given or replicas serve)."""
    replicas: ReplicaSpec | None = None
    """Retrieval replicas the entrypoint starts as Ray actors (``openrlhf.retrieval_replicas``), else ``None``."""
    notes: list[str] = field(default_factory=list)
    """Human-readable mapping decisions (printed with ``--dry-run``)."""
    megatron_config: Any = None
    """The :class:`MegatronActorConfig` of the Megatron strategy, written to :attr:`megatron_file` (None = DeepSpeed).
    """
    megatron_file: Path | None = None
    """JSON path of :attr:`megatron_config` (exported as ``OPENRLHF_SEARCH_MEGATRON_CONFIG``)."""

    def render(self) -> str:
        """Shell-pastable text of the plan (``--dry-run`` output)."""
        lines = [f"# {n}" for n in self.notes]
        if self.server_command:
            lines.append("# retrieval server (started first, stopped at the end):")
            lines.append(shlex.join(self.server_command) + " &")
        if self.replicas is not None:
            r = self.replicas
            count = "one per Ray node" if r.replicas == "per_node" else f"{r.replicas}, spread over the Ray nodes"
            lines.append(f"# retrieval: replicas of {r.index} as Ray actors ({count}; {r.num_cpus:g} CPU, "
                         f"{r.num_gpus:g} GPU each), started by the entrypoint")
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


def _orl_config(config: TrainConfig, openrlhf: OpenRLHFConfig | dict | None) -> OpenRLHFConfig:
    """The ``openrlhf`` section: the argument when given (programmatic use), else the tree's."""
    value = openrlhf if openrlhf is not None else getattr(config, "openrlhf", None)
    if value is None:
        return OpenRLHFConfig()
    if isinstance(value, dict):
        return from_dict(OpenRLHFConfig, value, "config section 'openrlhf'")
    return value


STRATEGIES = ("deepspeed", "megatron")
"""Training actors of the OpenRLHF backend (``openrlhf.strategy``): OpenRLHF's DeepSpeed ones or the Megatron ones."""

MEGATRON_KEYS = ("strategy", "megatron", "megatron_actor")
"""Keys of a ``megatron`` mapping passed to :func:`build_plan` (programmatic use; the tree itself has ``backend``,
``openrlhf.strategy`` and ``megatron``; the Megatron actor settings are derived from ``algorithm``/``rollout``)."""

MEGATRON_FROM_OPTIMIZER = {"lr": "lr", "weight_decay": "weight_decay", "clip_grad": "grad_clip"}
"""``megatron.<key>`` filled from ``optimizer.<field>`` when the ``megatron:`` section does not set it."""


def _megatron_given(config: TrainConfig, megatron: MegatronTrainConfig) -> set[str]:
    """Fields of ``config.megatron`` the user set (from the loader's origin map; for a config built in code, the
    fields that differ from the defaults)."""
    origin = getattr(config, "_origin", None)
    if origin is not None:
        return {k.split(".")[1] for k in origin if k.startswith("megatron.")}
    default = MegatronTrainConfig()
    return {f.name for f in dataclasses.fields(megatron) if getattr(megatron, f.name) != getattr(default, f.name)}


def uses_megatron(config: TrainConfig, orl: OpenRLHFConfig | None = None) -> bool:
    """The Megatron strategy: ``backend: megatron`` or ``openrlhf.strategy: megatron``."""
    return config.backend == "megatron" or (orl or config.openrlhf).strategy == "megatron"


def _raise(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


def resolve_megatron(config: TrainConfig, orl: OpenRLHFConfig, megatron: Any = None,
                     problems: list[str] | None = None) -> tuple[MegatronActorConfig | None, list[str], list[str]]:
    """Resolve the Megatron strategy into a :class:`MegatronActorConfig` + extra OpenRLHF flags + notes
    (``(None, [], [])`` for DeepSpeed).

    ``megatron``: None = the tree (``backend: megatron`` or ``openrlhf.strategy: megatron`` with its ``megatron``
    section); a :class:`MegatronActorConfig` (used as given: the Megatron strategy); or a mapping of the keys
    ``strategy`` (``deepspeed``, the default, or ``megatron``), ``megatron``, ``megatron_actor`` (programmatic use).
    ``megatron.lr``/``weight_decay``/``clip_grad``/``adam_beta1``/``adam_beta2`` default to the ``optimizer`` section
    and ``micro_batch_size`` to ``openrlhf.micro_train_batch_size`` unless set. In every case the Megatron actor's
    loss, temperature, epochs, per-rank batch and plugins come from ``algorithm``/``rollout``/``plugins``, so the same
    YAML trains the same objective on either strategy; ``algorithm.kl_coef``/``kl_estimator`` become the registry
    loss's KL term against the Megatron reference actor's log-probs.

    ``problems``: a list that receives every problem (then nothing is raised and the result may be partial);
    without it the first batch of problems raises one ``ValueError``.
    """
    out: list[str] = []
    given_loss = None
    if megatron is None:
        if not uses_megatron(config, orl):
            return None, [], []
        meg = config.megatron
        given = _megatron_given(config, meg)
        bc = MegatronActorConfig(megatron=dataclasses.replace(meg))
    elif isinstance(megatron, dict):
        unknown = sorted(set(megatron) - set(MEGATRON_KEYS))
        if unknown:
            raise ValueError(f"megatron config: unknown key(s) {unknown}; valid: {list(MEGATRON_KEYS)}")
        strategy = megatron.get("strategy", "deepspeed")
        if strategy not in STRATEGIES:
            raise ValueError(f"megatron config: strategy={strategy!r} is not one of {list(STRATEGIES)}")
        if strategy != "megatron":
            return None, [], []
        bc = MegatronActorConfig.from_dict(megatron, source="megatron config")  # validates names and types
        given = set((megatron.get("megatron") or {}).keys())
        given_loss = (megatron.get("megatron_actor") or {}).get("loss")
    else:
        bc = dataclasses.replace(megatron, actor=dataclasses.replace(megatron.actor))
        given = {f.name for f in dataclasses.fields(bc.megatron)}
    if config.backend == "megatron" and config.openrlhf.strategy != "megatron" and \
            "openrlhf.strategy" in getattr(config, "_origin", {}):
        out.append(f"backend=megatron with openrlhf.strategy={config.openrlhf.strategy!r}: the megatron backend is "
                   "the OpenRLHF backend with Megatron actors; drop openrlhf.strategy or use backend: openrlhf")
    if config.model.lora_rank > 0:
        out.append("model.lora_rank > 0 with backend: megatron: LoRA is not implemented in the Megatron actor; use "
                   "the DeepSpeed strategy (--ds.lora.*) or model.lora_rank=0")
    opt = config.optimizer
    inherited = {**{k: float(getattr(opt, src)) for k, src in MEGATRON_FROM_OPTIMIZER.items()},
                 "adam_beta1": float(opt.betas[0]), "adam_beta2": float(opt.betas[1]),
                 "micro_batch_size": orl.micro_train_batch_size}  # fmt: skip
    bc.megatron = dataclasses.replace(bc.megatron, **{k: v for k, v in inherited.items() if k not in given})
    alg, ro = config.algorithm, config.rollout
    try:
        preset = preset_for(alg)
    except (KeyError, ValueError) as exc:  # reported by the config check
        out.append(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
        preset = None
    if preset is not None and preset.offpolicy:
        out.append(f"algorithm.name={alg.name!r}: the +{preset.offpolicy} off-policy modifier is not available with "
                   "backend: megatron (its actor does not pass vLLM's rollout log-probs to our loss); use the "
                   "DeepSpeed strategy or drop the modifier")
    if orl.async_train:
        out.append("openrlhf.async_train=true (--train.async_enable) is not available with backend: megatron: the "
                   "Megatron actors' weight broadcast was never run concurrently with generation and is not "
                   "versioned for staleness tags; use the DeepSpeed strategy")
    if preset is not None and given_loss is not None and given_loss != preset.policy_loss:
        out.append(f"megatron_actor.loss={given_loss!r} conflicts with algorithm.name={alg.name!r} (policy loss "
                   f"{preset.policy_loss!r}); drop megatron_actor.loss, the algorithm defines it")  # fmt: skip
    dup = bc.duplicate_actors
    world = orl.actor_num_nodes * orl.actor_num_gpus_per_node
    if world % dup:
        out.append(f"megatron.parallel: TP x PP x CP = {dup} does not divide the actor's "
                   f"openrlhf.actor_num_nodes x actor_num_gpus_per_node = {world}")  # fmt: skip
    if alg.kl_coef > 0 and (orl.ref_num_nodes * orl.ref_num_gpus_per_node) % dup:
        out.append(f"megatron.parallel: TP x PP x CP = {dup} does not divide the reference model's "
                   "openrlhf.ref_num_nodes x ref_num_gpus_per_node")  # fmt: skip
    try:
        check_sync_layout(orl.colocate_all)  # NCCL refuses the colocated weight-sync group (GPU-only defect)
    except ValueError as exc:
        out.append(str(exc))
    if dup > 1 and orl.param_dtype != "bf16":
        out.append("backend: megatron with TP x PP x CP > 1 needs openrlhf.param_dtype=bf16 (OpenRLHF's DeepSpeed "
                   "strategy asserts it whenever --ds.tensor_parallel_size > 1; Megatron's own precision is "
                   "megatron.precision)")  # fmt: skip
    dp = max(world // dup, 1)
    step_sequences = ro.prompts_per_step * ro.group_size // max(alg.num_minibatches, 1)
    micro = bc.megatron.micro_batch_size
    if not world % dup and (step_sequences % dp or (step_sequences // dp) % max(micro, 1)):
        out.append(f"backend: megatron: {step_sequences} sequences per optimizer step do not split into {dp} "
                   f"data-parallel ranks x megatron.micro_batch_size={micro}")  # fmt: skip
    if preset is not None:
        bc.actor.loss = preset.policy_loss
        bc.actor.loss_config = {**preset.loss_cfg, **alg.loss_overrides}
        if alg.kl_coef > 0:  # OpenRLHF's KL loss lives in its DeepSpeed actor; the Megatron actor uses the loss's
            bc.actor.loss_config.update(kl_coef=float(alg.kl_coef), kl_estimator=alg.kl_estimator)
        try:
            make_config(bc.actor.loss, **bc.actor.loss_config)  # validates the loss config before anything starts
        except (TypeError, ValueError) as exc:
            out.append(f"algorithm.loss_overrides: {exc}")
    if problems is not None:
        problems.extend(out)
    else:
        _raise(out)
    bc.actor.temperature = float(ro.temperature)
    bc.actor.max_epochs = int(alg.ppo_epochs)
    bc.actor.plugins = list(config.plugins)
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


def _effective_orl(orl: OpenRLHFConfig, megatron: bool) -> tuple[OpenRLHFConfig, list[str]]:
    """The section as the Megatron strategy runs it (no sample packing, no prefix caching) and the notes."""
    notes = []
    if megatron and orl.packing_samples:
        orl = dataclasses.replace(orl, packing_samples=False)
    if megatron and orl.vllm_enable_prefix_caching:
        # OpenRLHF's DeepSpeed actor resets vLLM's prefix cache before each weight sync; the Megatron actor's
        # broadcast_to_vllm does not, so cached KV blocks of the old weights would be reused after a sync.
        orl = dataclasses.replace(orl, vllm_enable_prefix_caching=False)
        notes.append("backend megatron: vLLM prefix caching off (its weight sync does not reset the prefix cache)")
    return orl, notes


def _replicas(config: TrainConfig, orl: OpenRLHFConfig) -> ReplicaSpec | None:
    """The retrieval replicas to start (``openrlhf.retrieval_replicas`` != 0 on an index directory), else None."""
    try:
        count = parse_replicas(orl.retrieval_replicas)
    except ValueError:
        return None  # reported by OpenRLHFConfig.problems
    spec = config.retriever.spec
    if not count or orl.retrieval_url or not spec or spec.startswith("http"):
        return None
    return ReplicaSpec(index=str(Path(spec).resolve()), replicas=count, num_cpus=orl.retrieval_replica_cpus,
                       num_gpus=orl.retrieval_replica_gpus)


def _retrieval(config: TrainConfig, orl: OpenRLHFConfig) -> tuple[str, list[str] | None]:
    """``(URL(s) the agents query, server command to start first or None)``; ``("", None)`` with replicas."""
    if orl.retrieval_url:
        return orl.retrieval_url, None
    if not config.retriever.spec or config.retriever.spec.startswith("http"):
        return config.retriever.spec, None
    if _replicas(config, orl) is not None:
        return "", None
    return f"http://{orl.retrieval_host}:{orl.retrieval_port}", [
        orl.python or sys.executable, "-m", "openrlhf_search", "serve", "--index", config.retriever.spec,
        "--host", orl.retrieval_host, "--port", str(orl.retrieval_port)]  # fmt: skip


def plan_problems(config: TrainConfig, openrlhf: OpenRLHFConfig | dict | None = None, megatron: Any = None,
                  cluster: bool = True) -> list[str]:
    """Every problem of ``config`` for the OpenRLHF backend, one line each (``[]`` if none): the ``openrlhf``
    section's ranges, the Megatron strategy's layout, the flags' translation, multi-node and retriever rules and
    (``cluster``) the inputs a cluster run needs (:func:`check_cluster_inputs`)."""
    try:
        load_plugins(config.plugins, source="plugins")  # the driver resolves names too
    except ValueError as exc:
        return [str(exc)]
    try:
        orl = _orl_config(config, openrlhf)
    except ValueError as exc:
        return [str(exc)]
    out = list(orl.problems())
    bc, _, _ = resolve_megatron(config, orl, megatron, problems=out)
    orl, _ = _effective_orl(orl, bc is not None)
    if bc is not None and orl.resume:
        out.append("openrlhf.resume / --resume: not available with backend: megatron (its checkpoints are HF weights "
                   "only, without optimizer or dataloader state, and OpenRLHF would silently start over); restart "
                   "from a saved <ckpt>/global_step<N>_hf directory as model.path instead")
    if orl.packing_samples and "flash_attention" not in orl.attn_implementation:
        out.append(f"openrlhf.packing_samples=true with openrlhf.attn_implementation={orl.attn_implementation!r}: "
                   "OpenRLHF 0.11.2 then silently switches to flash_attention_2; set packing_samples=false or a "
                   "flash_attention implementation")  # fmt: skip
    nodes = run_nodes(config, orl)
    if nodes > 1 and not orl.shared_dir:
        out.append(f"a {nodes}-node run needs openrlhf.shared_dir: OpenRLHF's trainer actor reads the prompt dataset "
                   "and the actor ranks write checkpoints on whichever node Ray places them; set it to a directory "
                   "mounted at the same path on every node")  # fmt: skip
    out += flag_problems(config, orl)
    retrieval_url, server_command = _retrieval(config, orl)
    replicas = _replicas(config, orl)
    if not retrieval_url and replicas is None:
        out.append("retriever.spec is empty and openrlhf.retrieval_url is unset: the agent needs a retriever")
    try:
        asked = parse_replicas(orl.retrieval_replicas)
    except ValueError:
        asked = 0  # reported by OpenRLHFConfig.problems
    if asked and replicas is None and retrieval_url:
        out.append(f"openrlhf.retrieval_replicas={orl.retrieval_replicas}: replicas serve an index directory, but "
                   f"the retriever is the running server {retrieval_url} (set retriever.spec to the index directory "
                   "and leave openrlhf.retrieval_url empty, or set retrieval_replicas: 0)")
    try:
        urls = parse_urls(retrieval_url) if retrieval_url.startswith("http") else []
    except ValueError as exc:
        out.append(f"openrlhf.retrieval_url / retriever.spec: {exc}")
        urls = []
    for url in urls:
        host = urllib.parse.urlsplit(url).hostname or ""
        if host in ("0.0.0.0", "::"):
            out.append(f"retriever at {url}: {host} is an address to listen on, not one to connect to (the "
                       "agents would call themselves); give the server's own address, e.g. the head node's")
        if nodes > 1 and (host in ("localhost", "::1") or host.startswith("127.")):
            where = "openrlhf.retrieval_host" if server_command else "the retriever URL"
            out.append(f"retriever at {url} on a {nodes}-node run: the agents in the vLLM engines on the other "
                       f"nodes cannot reach a loopback address; set {where} to the head node's address")
    if cluster:
        out += cluster_input_problems(config, orl, bc is not None)
    return list(dict.fromkeys(out))


def cluster_size(orl: OpenRLHFConfig) -> tuple[int | None, int]:
    """``(nodes or None, GPUs per node)`` of the cluster: the Slurm allocation the launcher runs in, else
    ``openrlhf.cluster_nodes`` (0: unknown) and ``openrlhf.cluster_gpus_per_node``."""
    nodes, gpus = cluster_from_env()
    if nodes is not None and gpus is not None:
        return nodes, gpus
    return (orl.cluster_nodes or None), orl.cluster_gpus_per_node


def run_nodes(config: TrainConfig, orl: OpenRLHFConfig) -> int:
    """Nodes the run spans: the actor's and the reference's, and the vLLM-only ones (engines that are not colocated
    fill GPUs beyond the training groups')."""
    ref = config.algorithm.kl_coef > 0
    ref_gpus = orl.ref_num_nodes * orl.ref_num_gpus_per_node if ref else 0
    total = gpus_needed(orl.actor_num_nodes * orl.actor_num_gpus_per_node, ref_gpus,
                        orl.vllm_num_engines * orl.vllm_tensor_parallel_size, orl.colocate_all, False, orl.async_train)
    return max(orl.actor_num_nodes, orl.ref_num_nodes if ref else 1, nodes_spanned(total, cluster_size(orl)[1]))


def cluster_problems(config: TrainConfig, plan: LaunchPlan, orl: OpenRLHFConfig) -> list[str]:
    """What DeepSpeed, Ray's placement groups and vLLM would refuse in ``plan``'s command
    (:func:`.cluster.check_command`: batch arithmetic, colocation, TP vs the model's heads when ``model.path`` is a
    local directory, the GPU count vs the cluster of :func:`cluster_size` when its node count is known)."""
    heads, kv_heads = model_heads(str(config.model.path))
    nodes, gpus_per_node = cluster_size(orl)
    par = plan.megatron_config.megatron.parallel if plan.megatron_config is not None else None
    return check_command(plan.command[3:], strategy="megatron" if par is not None else "deepspeed",
                         megatron_tp=par.tensor_model_parallel_size if par else 1,
                         megatron_pp=par.pipeline_model_parallel_size if par else 1,
                         megatron_cp=par.context_parallel_size if par else 1, heads=heads, kv_heads=kv_heads,
                         cluster_nodes=nodes, cluster_gpus_per_node=gpus_per_node)  # fmt: skip


def build_plan(config: TrainConfig, openrlhf: OpenRLHFConfig | dict | None = None, megatron: Any = None) -> LaunchPlan:
    """Translate ``config`` into a :class:`LaunchPlan` without touching the file system or network.

    Raises ``ValueError`` with every problem of :func:`plan_problems` (the cluster inputs aside: see
    :func:`check_cluster_inputs`). ``openrlhf``/``megatron``: programmatic replacements of the tree's ``openrlhf``
    section and Megatron selection (see :func:`resolve_megatron`).
    """
    _raise(plan_problems(config, openrlhf, megatron, cluster=False))
    orl = _orl_config(config, openrlhf)
    megatron_config, megatron_flags, megatron_notes = resolve_megatron(config, orl, megatron)
    orl, more = _effective_orl(orl, megatron_config is not None)
    megatron_notes += more
    output = Path(orl.shared_dir or Path(config.logging.output_dir) / "openrlhf").resolve()
    workdir = Path(orl.workdir).resolve() if orl.workdir else output
    paths = {"agent_py": AGENT_FILE, "prompts": workdir / "prompts.jsonl", "output": output}
    flags, patch, notes = build_flags(config, orl, paths)
    if megatron_config is not None:
        extra = list(orl.extra_args)
        flags = flags[: len(flags) - len(extra)] + megatron_flags + extra  # extra_args still win
        patch.loss, patch.loss_config = "", {}  # the Megatron actor runs the registry loss itself
        notes = [n for n in notes if not n.startswith("loss ")] + megatron_notes
    retrieval_url, server_command = _retrieval(config, orl)
    replicas = _replicas(config, orl)
    agent = agent_config_from_tree(config, retrieval_url, record_logprobs=orl.record_rollout_logprobs,
                                   calib_records=needs_records(patch.chain()),
                                   rollout_dir=str(paths["output"] / "rollouts"),
                                   retrieval_replicas=replicas.name if replicas else "")  # fmt: skip
    agent_file, patch_file = workdir / "agent.json", workdir / "patch.json"
    shared = [str(paths["prompts"])] + ([str(Path(replicas.index) / "manifest.json")] if replicas else [])
    env = {AGENT_CONFIG_ENV: str(agent_file), PATCH_CONFIG_ENV: str(patch_file),
           SHARED_FILES_ENV: os.pathsep.join(shared)}  # fmt: skip
    if replicas is not None:
        env[REPLICAS_ENV] = replicas.to_json()
    megatron_file = None
    if megatron_config is not None:
        megatron_file = workdir / "megatron.json"
        env[MEGATRON_CONFIG_ENV] = str(megatron_file)
    if orl.ray_address:
        env["RAY_ADDRESS"] = orl.ray_address
    command = [orl.python or sys.executable, "-m", "openrlhf_search.integrations.openrlhf.entrypoint", *flags]
    return LaunchPlan(command=command, env=env, workdir=workdir, prompt_file=paths["prompts"], agent_config=agent,
                      agent_file=agent_file, patch_config=patch, patch_file=patch_file, retrieval_url=retrieval_url,
                      server_command=server_command, replicas=replicas, notes=notes, megatron_config=megatron_config,
                      megatron_file=megatron_file)  # fmt: skip


def cluster_input_problems(config: TrainConfig, orl: OpenRLHFConfig, megatron: bool) -> list[str]:
    """The launches that cannot work or would silently train on the wrong thing: a Megatron run on a model that is
    not a local directory (mbridge loads HF weights from disk; a hub id is not downloaded), and a run on the
    synthetic toy KB that the config did not ask for (``data.source`` left at its default: a config that forgot its
    ``data:`` section)."""
    out = []
    model = str(config.model.path)
    if megatron and not Path(model).is_dir():
        out.append(f"model.path={model!r} is not a local directory: the Megatron backend loads the HF weights from "
                   "disk (mbridge) and does not download hub ids; fetch it first (e.g. `huggingface-cli download "
                   "<id> --local-dir DIR`, on storage every node sees) and pass DIR")  # fmt: skip
    if config.data.source == "synthetic" and "data.source" not in getattr(config, "_origin", {}):
        out.append("data.source='synthetic' (the toy KB, the default when the config has no data: section) on an "
                   "OpenRLHF run: give a data: section (e.g. Search-R1's train files) and a retriever, or write "
                   "data.source: synthetic if the toy run is intended")  # fmt: skip
    return out


def check_cluster_inputs(config: TrainConfig, plan: LaunchPlan, orl: OpenRLHFConfig) -> None:
    """Raise ``ValueError`` with :func:`cluster_input_problems` and :func:`cluster_problems` of a plan."""
    _raise(cluster_input_problems(config, orl, plan.megatron_config is not None))
    problems = cluster_problems(config, plan, orl)
    if problems:
        raise ValueError(" | ".join(problems))


def checkpoint_dir(plan: LaunchPlan) -> Path:
    """The DeepSpeed actor checkpoint OpenRLHF resumes from (``<--ckpt.path>/_actor``)."""
    return Path(plan.command[plan.command.index("--ckpt.path") + 1]) / "_actor"


