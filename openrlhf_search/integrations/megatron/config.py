"""Typed configuration of the Megatron backend (parallel layout, precision, optimizer, recompute)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from openrlhf_search.config import build_typed, section
from openrlhf_search.plugins import load_plugins

MEGATRON_CONFIG_ENV = "OPENRLHF_SEARCH_MEGATRON_CONFIG"
"""Environment variable holding the path of the :class:`MegatronActorConfig` JSON file (read in the Ray actors)."""


@dataclass
class MegatronParallelConfig:
    """Model-parallel layout; world size = TP x PP x CP x DP."""

    tensor_model_parallel_size: int = 1
    """TP: attention heads / MLP columns split across this many ranks (within a node on GPUs)."""
    pipeline_model_parallel_size: int = 1
    """PP: transformer layers split into this many stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """VPP: model chunks per PP rank (interleaved 1F1B); None disables interleaving. Needs
    ``num_layers % (PP * VPP) == 0``; p2p uses ``overlap_p2p_comm`` (batched p2p gives wrong losses)."""
    context_parallel_size: int = 1
    """CP: sequence split across ranks in attention. Needs Transformer Engine attention (GPU-only,
    unverified here); must be 1 with the local layer spec."""
    sequence_parallel: bool = False
    """Shard LayerNorm/dropout activations along the sequence over the TP group (needs TP > 1)."""

    def validate(self, world_size: int, num_layers: int) -> int:
        """Check the layout against ``world_size`` and ``num_layers``; return the data-parallel size."""
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        model_parallel = tp * pp * cp
        if min(tp, pp, cp) < 1 or world_size % model_parallel:
            raise ValueError(
                f"megatron.parallel: world size {world_size} is not divisible by TP({tp}) x PP({pp}) x CP({cp})"
            )
        vpp = self.virtual_pipeline_model_parallel_size or 1
        if num_layers % (pp * vpp):
            raise ValueError(f"megatron.parallel: {num_layers} layers do not split into PP({pp}) x VPP({vpp}) chunks")
        if self.virtual_pipeline_model_parallel_size is not None and pp < 2:
            raise ValueError(
                "megatron.parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1"
            )
        if self.sequence_parallel and tp < 2:
            raise ValueError("megatron.parallel.sequence_parallel needs tensor_model_parallel_size > 1")
        return world_size // model_parallel


@section("megatron")
@dataclass
class MegatronTrainConfig:
    """Everything the Megatron actor needs besides the model path (see ``docs/megatron.md``)."""

    parallel: MegatronParallelConfig = field(default_factory=MegatronParallelConfig)
    """Parallel layout."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Parameter/compute dtype; bf16 keeps fp32 main params in the optimizer."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state (and fp32 main params) across the data-parallel group (ZeRO-1 like)."""
    recompute_granularity: Literal["none", "full", "selective"] = "none"
    """Activation recomputation: ``full`` recomputes whole layers (``recompute_num_layers`` per chunk),
    ``selective`` only the core attention."""
    recompute_num_layers: int = 1
    """Layers per recompute chunk with ``recompute_granularity: full``."""
    lr: float = 1e-6
    """Peak learning rate (Adam)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch in the pipeline schedule."""
    seed: int = 1234
    """Seed of the model-parallel RNG tracker (dropout, init)."""
    use_transformer_engine: bool | None = None
    """Layer spec: True = Transformer Engine (GPU-only, unverified here), False = megatron-core local spec,
    None = TE when importable and CUDA is available."""
    weight_sync_bucket_mb: float = 512.0
    """Size bound of one weight-sync broadcast bucket to vLLM, in MiB."""

    @property
    def dtype(self):
        """torch dtype of :attr:`precision`."""
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "megatron") -> MegatronTrainConfig:
        """Build from a plain mapping (e.g. the ``megatron:`` section of a YAML config).

        Unknown keys raise a ``ValueError`` naming ``where.key``.
        """
        data = dict(data)
        parallel = data.pop("parallel", {}) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        pknown = {f.name for f in fields(MegatronParallelConfig)}
        punknown = sorted(set(parallel) - pknown)
        if punknown:
            raise ValueError(f"{where}.parallel: unknown field(s) {punknown}; known: {sorted(pknown)}")
        return build_typed(cls, {**data, "parallel": parallel}, where, prefix="megatron.")  # types checked


@dataclass
class ActorSettings:
    """Role and RL settings of a Megatron actor (the parallel layout lives in :class:`MegatronTrainConfig`)."""

    role: Literal["policy", "reference"] = "policy"
    """``policy`` trains (DDP + optimizer); ``reference`` only computes log-probs."""
    loss: str = "grpo"
    """Registry policy loss name (``openrlhf_search.algorithms.get_policy_loss``): grpo, dapo, gspo, dspo, sapo..."""
    loss_config: dict[str, Any] = field(default_factory=dict)
    """Overrides of the loss's config fields (e.g. ``{"clip_high": 0.28}``; a plugin loss's own fields too)."""
    temperature: float = 1.0
    """Rollout sampling temperature (log-probs are computed at the same temperature)."""
    train_batch_size: int | None = None
    """Sequences per optimizer step on this data-parallel rank; None = everything appended in one step."""
    max_epochs: int = 1
    """Passes over the appended experience per ``fit``."""
    plugins: list[str] = field(default_factory=list)
    """The config tree's ``plugins``: imported by the actor before it resolves :attr:`loss`."""


def build_actor_loss(settings: ActorSettings):
    """The policy loss of a Megatron actor: import ``settings.plugins`` (a user's loss may live there), then resolve
    ``settings.loss`` in the registry (the same path as the local trainer and the OpenRLHF loss patch)."""
    from openrlhf_search.algorithms.losses import get_policy_loss  # torch: the config itself stays light

    load_plugins(settings.plugins, source="megatron_actor.plugins")
    return get_policy_loss(settings.loss, **settings.loss_config)


@dataclass
class MegatronActorConfig:
    """What the Megatron actors receive: a view of the one config tree (its ``megatron`` section and the actor
    settings derived from ``algorithm``/``rollout``/``plugins``), built by the launcher's ``resolve_megatron`` only for
    the Megatron strategy (``backend: megatron`` or ``openrlhf.strategy: megatron``) and serialised to JSON for the
    Ray actors. In YAML it is written as ``backend: megatron`` plus a ``megatron:`` section of the tree.

    Example::

        backend: megatron
        megatron:
          parallel: {tensor_model_parallel_size: 8, pipeline_model_parallel_size: 2, sequence_parallel: true}
          precision: bf16
          use_distributed_optimizer: true
          recompute_granularity: full
    """

    megatron: MegatronTrainConfig = field(default_factory=MegatronTrainConfig)
    """Megatron settings (parallel layout, precision, optimizer)."""
    actor: ActorSettings = field(default_factory=ActorSettings)
    """Loss and batch settings of the Megatron actors."""

    @property
    def duplicate_actors(self) -> int:
        """OpenRLHF's duplicate factor: consecutive actors receiving the same batch (= one model replica)."""
        p = self.megatron.parallel
        return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> MegatronActorConfig:
        """Build from a mapping with the keys ``megatron`` and ``megatron_actor`` (the JSON file, or a top-level YAML
        mapping: other keys are not read).

        Raises ``ValueError`` naming ``source`` and the field for unknown keys or wrong types.
        """
        megatron = MegatronTrainConfig.from_dict(data.get("megatron") or {}, where=f"{source}: megatron")
        actor_data = dict(data.get("megatron_actor") or {})
        known = {f.name for f in fields(ActorSettings)}
        unknown = sorted(set(actor_data) - known)
        if unknown:
            raise ValueError(f"{source}: megatron_actor: unknown field(s) {unknown}; known: {sorted(known)}")
        actor = build_typed(ActorSettings, actor_data, f"{source}: megatron_actor", prefix="megatron_actor.")
        return cls(megatron=megatron, actor=actor)

    def to_json_file(self, path: str) -> str:
        """Write as JSON (for :data:`MEGATRON_CONFIG_ENV`); returns ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        data = dataclasses.asdict(self)
        data["megatron_actor"] = data.pop("actor")
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        return path

    @classmethod
    def from_env(cls) -> MegatronActorConfig:
        """Read the JSON file named by :data:`MEGATRON_CONFIG_ENV` (inside Ray actors)."""
        path = os.environ.get(MEGATRON_CONFIG_ENV)
        if not path:
            raise RuntimeError(f"{MEGATRON_CONFIG_ENV} is not set: the launcher must write the Megatron actor config")
        with open(path) as f:
            return cls.from_dict(json.load(f), source=path)
