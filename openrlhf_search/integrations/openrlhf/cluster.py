"""Cluster arithmetic of an OpenRLHF run, checked before anything starts (pure Python, no Ray, no torch).

A GPU layout that DeepSpeed, Ray or vLLM will refuse fails minutes into a run (after Ray, the placement groups and
the model loads) or, worse, never fails: a placement group that cannot be satisfied waits forever. Every rule here
is read from the pinned upstream sources and restated in plain arithmetic, so :func:`check_cluster` can refuse the
layout at launch with one line per problem:

* **DeepSpeed 0.19** (``runtime/config.py``, ``_set_batch_related_parameters`` and ``_batch_assertion``): given a
  train batch and a micro-batch, it derives ``accumulation = train_batch // micro // world`` and asserts
  ``train_batch == micro * accumulation * world`` (and ``accumulation > 0``). OpenRLHF 0.11.2's
  ``DeepspeedStrategy`` gives it ``train_batch = --train.batch_size x ring_attn_size x ds.tensor_parallel_size``
  and ``world`` = all ranks of the model group, for the actor (``get_ds_train_config``) and for the reference
  model (``get_ds_eval_config``, which goes through ``deepspeed.initialize`` too).
* **OpenRLHF 0.11.2** (``cli/train_ppo_ray.py``): with ``--train.colocate_all`` *and without* async training the
  actor, the reference and the vLLM engines share one placement group of ``actor nodes x GPUs`` bundles, so
  ``vllm engines x vllm TP`` must equal that count; colocating actor and reference needs equal node and GPU
  counts; ``n_samples x rollout batch // rollout micro-batch`` must be at least the number of data-parallel actor
  processes. **With async training OpenRLHF does not colocate vLLM** (it passes no shared placement group), so the
  engines ask Ray for ``engines x TP`` GPUs of their own; on a cluster the actor group already fills this waits
  forever, and even where it fits nothing is colocated: the combination is refused.
* **Ray placement groups**: every group asks for one GPU per bundle; the groups that are not colocated add up,
  and a total above the cluster's GPUs never schedules (no error, a hang).
* **vLLM 0.29**: ``ModelConfig.verify_with_parallel_config`` raises unless the tensor-parallel size divides the
  attention heads; ``QKVParallelLinear`` divides the KV heads by TP, or, when TP >= KV heads, replicates them
  ``TP / KV heads`` times (so TP must then be a multiple of the KV heads). OpenRLHF takes each engine's TP bundles
  from one node's list (``get_bundle_indices``): an engine larger than a node is refused.
* **Megatron-core** (``backend: megatron``): TP x PP x CP divides the actor's ranks; TP divides the attention heads
  and the KV heads (query groups).

Values are plain numbers so the config validation, the launcher, the recipes' tests and users can all call it;
:func:`command_layout` reads them back from an OpenRLHF command line, so the check sees exactly the flags
OpenRLHF will parse (``openrlhf.extra_args`` included).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def deepspeed_batch_problem(what: str, train_batch: int, micro: int, world: int) -> str | None:
    """DeepSpeed's own batch arithmetic for one model group, or None when it passes.

    Args:
        what: the group in the message (``"actor"``, ``"reference"``).
        train_batch: the ``train_batch_size`` DeepSpeed receives (OpenRLHF: ``--train.batch_size`` x ring x TP).
        micro: ``train_micro_batch_size_per_gpu`` (``--train.micro_batch_size``).
        world: ranks of the group (nodes x GPUs per node).
    """
    accumulation = train_batch // micro // world
    if accumulation < 1:
        return (f"DeepSpeed ({what}): train batch {train_batch} < micro-batch {micro} x {world} ranks = "
                f"{micro * world}, so 0 gradient-accumulation steps (DeepSpeed asserts > 0); lower "
                "openrlhf.micro_train_batch_size or the ranks, or raise rollout.prompts_per_step x group_size / "
                "algorithm.num_minibatches")  # fmt: skip
    if accumulation * micro * world != train_batch:
        return (f"DeepSpeed ({what}): train batch {train_batch} != micro-batch {micro} x {accumulation} "
                f"accumulation steps x {world} ranks = {micro * accumulation * world} (DeepSpeed takes "
                f"{train_batch} // {micro} // {world} = {accumulation} steps and asserts the product); make "
                f"rollout.prompts_per_step x group_size / algorithm.num_minibatches a multiple of "
                f"{micro} x {world} = {micro * world}, or change the node count")  # fmt: skip
    return None


def tp_heads_problem(what: str, tp: int, heads: int | None, kv_heads: int | None, replicate_kv: bool) -> str | None:
    """Attention-head divisibility of a tensor-parallel size, or None when it passes (or heads are unknown).

    ``replicate_kv``: vLLM's rule (TP >= KV heads replicates them: TP must be a multiple of the KV heads); without
    it (Megatron) TP must divide the KV heads.
    """
    if tp <= 1:
        return None
    if heads is not None and heads % tp:
        return f"{what} TP {tp} does not divide the model's {heads} attention heads ({heads} % {tp} = {heads % tp})"
    if kv_heads is None:
        return None
    if replicate_kv and tp >= kv_heads:
        if tp % kv_heads:
            return (f"{what} TP {tp} is not a multiple of the model's {kv_heads} KV heads (vLLM replicates KV heads "
                    f"when TP >= KV heads: {tp} % {kv_heads} = {tp % kv_heads})")  # fmt: skip
    elif kv_heads % tp:
        return f"{what} TP {tp} does not divide the model's {kv_heads} KV heads ({kv_heads} % {tp} = {kv_heads % tp})"
    return None


def gpus_needed(actor_gpus: int, ref_gpus: int, vllm_gpus: int, colocate_all: bool, colocate_actor_ref: bool,
                async_train: bool) -> int:
    """GPUs the placement groups reserve together (what OpenRLHF 0.11.2 asks Ray for)."""
    if colocate_all and not async_train:
        return actor_gpus  # one group: actor, reference and vLLM share its bundles
    if colocate_all or colocate_actor_ref:
        return actor_gpus + vllm_gpus  # actor and reference share; vLLM has its own group
    return actor_gpus + ref_gpus + vllm_gpus


def nodes_spanned(total_gpus: int, gpus_per_node: int) -> int:
    """Nodes a layout of ``total_gpus`` occupies at least (every multi-node guard must count all of them)."""
    return max(1, math.ceil(total_gpus / max(gpus_per_node, 1)))


def check_cluster(*, actor_nodes: int, actor_gpus_per_node: int, ref_nodes: int = 0, ref_gpus_per_node: int = 0,
                  vllm_engines: int = 0, vllm_tp: int = 1, colocate_all: bool = False,
                  colocate_actor_ref: bool = False, async_train: bool = False, train_batch: int | None = None,
                  micro_train_batch: int = 1, rollout_batch: int | None = None, n_samples: int = 1,
                  micro_rollout_batch: int = 1, ds_tp: int = 1, ring_attn: int = 1, strategy: str = "deepspeed",
                  megatron_tp: int = 1, megatron_pp: int = 1, megatron_cp: int = 1, heads: int | None = None,
                  kv_heads: int | None = None, cluster_nodes: int | None = None,
                  cluster_gpus_per_node: int | None = None) -> list[str]:  # fmt: skip
    """Every problem DeepSpeed, Ray placement groups, vLLM (and Megatron) would hit with this layout, one line each.

    Args:
        actor_nodes, actor_gpus_per_node: the policy group (``--actor.num_nodes``/``num_gpus_per_node``).
        ref_nodes, ref_gpus_per_node: the reference group; ``ref_nodes=0`` when no reference model is created
            (OpenRLHF creates it only with a KL coefficient > 0).
        vllm_engines, vllm_tp: vLLM engines and the tensor-parallel size of each.
        colocate_all, colocate_actor_ref, async_train: ``--train.colocate_all``, ``--train.colocate_actor_ref``,
            ``--train.async_enable``.
        train_batch, micro_train_batch: ``--train.batch_size`` (sequences per optimizer step, before OpenRLHF's
            ring/TP factor) and ``--train.micro_batch_size``; None skips the DeepSpeed batch check.
        rollout_batch, n_samples, micro_rollout_batch: ``--rollout.batch_size`` (prompts),
            ``--rollout.n_samples_per_prompt``, ``--rollout.micro_batch_size``; None skips their check.
        ds_tp, ring_attn: ``--ds.tensor_parallel_size`` and ``--ds.ring_attn_size`` (OpenRLHF's duplicate factor).
        strategy: ``"deepspeed"`` or ``"megatron"`` (then the Megatron actor's TP x PP x CP replaces DeepSpeed).
        megatron_tp, megatron_pp, megatron_cp: the Megatron actor's parallel sizes.
        heads, kv_heads: the model's attention and KV heads (None: unknown, the head checks are skipped).
        cluster_nodes, cluster_gpus_per_node: the cluster (None: unknown, the capacity checks are skipped).

    Returns:
        The problems, each one self-contained line with its arithmetic; empty when the layout passes.
    """
    problems: list[str] = []
    actor_gpus = actor_nodes * actor_gpus_per_node
    ref_gpus = ref_nodes * ref_gpus_per_node
    vllm_gpus = vllm_engines * vllm_tp
    if async_train and colocate_all:
        problems.append(
            f"openrlhf.async_train=true with colocate_all=true: OpenRLHF 0.11.2 colocates vLLM only when async "
            f"training is off, so the actor group's {actor_gpus} GPUs stay reserved and the {vllm_engines} vLLM "
            f"engines x TP {vllm_tp} = {vllm_gpus} GPUs wait for a placement group of their own (a hang on a full "
            "node); set colocate_all=false and size the actor and vLLM groups to fit side by side"
        )
    colocated_ref = colocate_all or colocate_actor_ref
    if colocated_ref and ref_nodes and (ref_nodes, ref_gpus_per_node) != (actor_nodes, actor_gpus_per_node):
        problems.append(
            f"colocated actor and reference need the same layout (OpenRLHF asserts it): actor {actor_nodes} x "
            f"{actor_gpus_per_node} GPUs, reference {ref_nodes} x {ref_gpus_per_node}"
        )
    if colocate_all and not async_train and vllm_engines and vllm_gpus != actor_gpus:
        problems.append(
            f"colocate_all: vLLM {vllm_engines} engines x TP {vllm_tp} = {vllm_gpus} GPUs must equal the actor's "
            f"{actor_nodes} nodes x {actor_gpus_per_node} GPUs = {actor_gpus} (OpenRLHF asserts it; they share one "
            "placement group)"
        )
    total = gpus_needed(actor_gpus, ref_gpus, vllm_gpus, colocate_all, colocate_actor_ref, async_train)
    if cluster_nodes is not None and cluster_gpus_per_node is not None:
        have = cluster_nodes * cluster_gpus_per_node
        if total > have:
            parts = f"actor {actor_gpus}"
            if not colocated_ref and ref_gpus:
                parts += f" + reference {ref_gpus}"
            if not (colocate_all and not async_train) and vllm_gpus:
                parts += f" + vLLM {vllm_engines} x TP {vllm_tp} = {vllm_gpus}"
            problems.append(
                f"the layout needs {total} GPUs ({parts}) but the cluster has {cluster_nodes} nodes x "
                f"{cluster_gpus_per_node} GPUs = {have}: Ray would wait forever for the placement groups"
            )
        for what, per_node in (("actor", actor_gpus_per_node), ("reference", ref_gpus_per_node if ref_nodes else 0)):
            if per_node > cluster_gpus_per_node:
                problems.append(f"openrlhf.{'ref' if what == 'reference' else what}_num_gpus_per_node={per_node} "
                                f"but the cluster's nodes have {cluster_gpus_per_node} GPUs")  # fmt: skip
        if vllm_engines and vllm_tp > cluster_gpus_per_node:
            problems.append(f"vLLM TP {vllm_tp} > {cluster_gpus_per_node} GPUs per node: OpenRLHF places one "
                            "engine's TP workers on one node's bundles")  # fmt: skip
    if vllm_engines:
        problem = tp_heads_problem("vLLM", vllm_tp, heads, kv_heads, replicate_kv=True)
        if problem:
            problems.append(problem)
    if strategy == "megatron":
        dup = megatron_tp * megatron_pp * megatron_cp
        for what, world in (("actor", actor_gpus), ("reference", ref_gpus)):
            if world and world % dup:
                problems.append(f"Megatron: TP {megatron_tp} x PP {megatron_pp} x CP {megatron_cp} = {dup} does not "
                                f"divide the {what}'s {world} ranks")  # fmt: skip
        problem = tp_heads_problem("Megatron", megatron_tp, heads, kv_heads, replicate_kv=False)
        if problem:
            problems.append(problem)
    elif train_batch is not None:
        ds_batch = train_batch * ring_attn * ds_tp
        groups = {actor_gpus: "actor"}
        if ref_gpus:
            groups[ref_gpus] = "actor and reference" if ref_gpus == actor_gpus else "reference"
        for world, what in groups.items():
            problem = deepspeed_batch_problem(what, ds_batch, micro_train_batch, world)
            if problem:
                problems.append(problem)
    if rollout_batch is not None:
        processes = actor_gpus // ring_attn // ds_tp
        batches = n_samples * rollout_batch // micro_rollout_batch
        if batches < processes:
            problems.append(
                f"rollout: {n_samples} samples x {rollout_batch} prompts // micro-batch {micro_rollout_batch} = "
                f"{batches} micro-batches < {processes} actor processes (OpenRLHF asserts >=)"
            )
    return problems


# ------------------------------------------------------------------------------------------ command lines
_INT_FLAGS = {
    "--actor.num_nodes": "actor_nodes",
    "--actor.num_gpus_per_node": "actor_gpus_per_node",
    "--ref.num_nodes": "ref_nodes",
    "--ref.num_gpus_per_node": "ref_gpus_per_node",
    "--vllm.num_engines": "vllm_engines",
    "--vllm.tensor_parallel_size": "vllm_tp",
    "--train.batch_size": "train_batch",
    "--train.micro_batch_size": "micro_train_batch",
    "--rollout.batch_size": "rollout_batch",
    "--rollout.n_samples_per_prompt": "n_samples",
    "--rollout.micro_batch_size": "micro_rollout_batch",
    "--ds.tensor_parallel_size": "ds_tp",
    "--ds.ring_attn_size": "ring_attn",
}
_SWITCHES = {"--train.colocate_all": "colocate_all", "--train.colocate_actor_ref": "colocate_actor_ref",
             "--train.async_enable": "async_train"}  # fmt: skip
_OPENRLHF_DEFAULTS = {"actor_nodes": 1, "actor_gpus_per_node": 8, "ref_nodes": 1, "ref_gpus_per_node": 8,
                      "vllm_engines": 0, "vllm_tp": 1, "train_batch": 128, "micro_train_batch": 1,
                      "rollout_batch": 1024, "n_samples": 1, "micro_rollout_batch": 1, "ds_tp": 1, "ring_attn": 1}
"""``train_ppo_ray``'s parser defaults for the flags above (a flag the command omits takes them)."""


def command_layout(flags: Sequence[str]) -> dict[str, Any]:
    """The :func:`check_cluster` keywords an OpenRLHF ``train_ppo_ray`` command line sets (the last occurrence wins,
    as in argparse; ``--flag=value`` accepted). ``--algo.kl.init_coef 0`` means no reference group (OpenRLHF creates
    it only for a KL coefficient > 0; its default is 0.01)."""
    out: dict[str, Any] = dict(_OPENRLHF_DEFAULTS)
    out.update({name: False for name in _SWITCHES.values()})
    kl = 0.01
    tokens = list(flags)
    for i, tok in enumerate(tokens):
        flag, eq, inline = tok.partition("=")
        value = inline if eq else (tokens[i + 1] if i + 1 < len(tokens) else "")
        if flag in _INT_FLAGS:
            out[_INT_FLAGS[flag]] = int(value)
        elif flag in _SWITCHES:
            out[_SWITCHES[flag]] = True
        elif flag == "--algo.kl.init_coef":
            kl = float(value)
    if kl <= 0:
        out["ref_nodes"], out["ref_gpus_per_node"] = 0, 0
    return out


def model_heads(model_path: str) -> tuple[int | None, int | None]:
    """``(attention heads, KV heads)`` from ``config.json`` of a local checkpoint directory (``text_config`` of
    multimodal configs too); ``(None, None)`` for a hub id or a directory without it (the head checks then skip)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None, None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    cfg = cfg.get("text_config") or cfg
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    return (int(heads) if heads else None), (int(kv) if kv else None)


def cluster_from_env(env: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """``(nodes, GPUs per node)`` of the Slurm allocation this runs in (``SLURM_JOB_NUM_NODES`` and
    ``SLURM_GPUS_ON_NODE``, else ``SLURM_GPUS_PER_NODE``), ``(None, None)`` outside one or without a GPU request."""
    env = os.environ if env is None else env
    nodes = env.get("SLURM_JOB_NUM_NODES", "").strip()
    gpus = (env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "").strip()
    gpus = gpus.rsplit(":", 1)[-1]  # "h100:8" -> "8"
    if not (nodes.isdigit() and gpus.isdigit()):
        return None, None
    return int(nodes), int(gpus)


def check_command(flags: Sequence[str], *, strategy: str = "deepspeed", megatron_tp: int = 1, megatron_pp: int = 1,
                  megatron_cp: int = 1, heads: int | None = None, kv_heads: int | None = None,
                  cluster_nodes: int | None = None, cluster_gpus_per_node: int | None = None) -> list[str]:
    """:func:`check_cluster` of an OpenRLHF command line (see :func:`command_layout`)."""
    layout = command_layout(flags)
    return check_cluster(**layout, strategy=strategy, megatron_tp=megatron_tp, megatron_pp=megatron_pp,
                         megatron_cp=megatron_cp, heads=heads, kv_heads=kv_heads, cluster_nodes=cluster_nodes,
                         cluster_gpus_per_node=cluster_gpus_per_node)  # fmt: skip
