"""Megatron GPTModel from a Hugging Face checkpoint, and back (Llama, Qwen2/Qwen2.5, Qwen3).

The HF <-> Megatron conversion is mbridge's (PyPI ``mbridge==0.15.1``: QKV interleaving per query group,
gate/up fusion, TP split/merge, PP/VPP layer renumbering). Three adapters make it work with megatron-core
0.16.1 and transformers 5 on any machine:

* **layer spec** - mbridge hard-codes the Transformer Engine spec, where the input/pre-MLP RMSNorms are fused
  into ``linear_qkv``/``linear_fc1`` (``*.layer_norm_weight``). With the megatron-core *local* spec they are
  separate modules (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``): two extra name mappings.
  TE is used only when it is importable and CUDA is available (GPU-only, not verified on this machine);
* **model construction** - built here per pipeline stage/virtual chunk instead of mbridge's ``get_model``
  (which wraps them with options this backend sets itself); each chunk is moved to the current GPU as
  ``get_model`` does (the local spec's torch norms are created on the CPU);
* **rope_theta** - transformers 5 moved it into ``config.rope_parameters``; restored as an attribute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from openrlhf_search.integrations.megatron.config import MegatronTrainConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
"""HF ``model_type`` values this backend converts and tests (tiny Llama/Qwen2 on CPU)."""

LOCAL_SPEC_ATTENTION_NAMES = {
    "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"],
}
"""Local-spec attention-block parameters missing from mbridge's TE-spec mapping (suffix -> HF names)."""

LOCAL_SPEC_MLP_NAMES = {
    "pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"],
}
"""Local-spec MLP-block parameters missing from mbridge's TE-spec mapping (suffix -> HF names)."""

# TransformerConfig overrides: CUDA-only fusions off, so the local spec computes in plain PyTorch.
_PORTABLE_CONFIG = {
    "masked_softmax_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "persist_layer_norm": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
}


def transformer_engine_usable() -> bool:
    """True when Transformer Engine imports and CUDA is available (the TE spec is GPU-only)."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def load_hf_config(hf_path: str) -> Any:
    """Load an HF config from a checkpoint dir and make it usable by mbridge.

    Raises ``ValueError`` naming the path when ``model_type`` is not one of :data:`SUPPORTED_MODEL_TYPES`.
    """
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(hf_path, "config.json")):
        raise FileNotFoundError(f"megatron: no config.json in HF checkpoint dir {hf_path!r}")
    cfg = AutoConfig.from_pretrained(hf_path)
    return adapt_hf_config(cfg, where=os.path.join(hf_path, "config.json"))


def adapt_hf_config(cfg: Any, where: str = "hf_config") -> Any:
    """Restore ``rope_theta`` (transformers 5 keeps it in ``rope_parameters``) and check the model type."""
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"megatron: {where}: model_type {cfg.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    rope = getattr(cfg, "rope_parameters", None) or {}
    if getattr(cfg, "rope_theta", None) is None:
        cfg.rope_theta = rope.get("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ValueError(f"megatron: {where}: rope_type {rope_type!r} is not supported (only default RoPE)")
    if getattr(cfg, "rope_scaling", None) is None:
        # mbridge's Llama bridge tests `"rope_scaling" in hf_config`; a None value means no scaling.
        cfg.rope_scaling = None
    return cfg


class SequenceParallelTorchNorm:
    """Local-spec norm factory that, unlike megatron's ``WrappedTorchNorm``, allows sequence parallelism.

    Builds ``torch.nn.RMSNorm``/``LayerNorm`` and tags its parameters with ``sequence_parallel`` so that
    ``finalize_model_grads`` all-reduces their gradients over the TP group (each TP rank sees a different
    sequence shard), exactly what Transformer Engine's norms do.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any):
        import torch

        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"megatron: normalization {config.normalization!r} is not supported by the local spec")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def replace_in_spec(spec: Any, old: type, new: type) -> Any:
    """Return ``spec`` (a megatron ModuleSpec tree) with every reference to module class ``old`` replaced by ``new``.

    Walks ``ModuleSpec.module``/``submodules``, dataclass submodule containers and lists; edits in place.
    """
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        spec.module = replace_in_spec(spec.module, old, new)
        spec.submodules = replace_in_spec(spec.submodules, old, new)
        return spec
    if isinstance(spec, list):
        return [replace_in_spec(item, old, new) for item in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for f in dataclasses.fields(spec):
            setattr(spec, f.name, replace_in_spec(getattr(spec, f.name), old, new))
        return spec
    return spec


def _adapted_bridge_class(base: type, use_te: bool) -> type:
    """Subclass of an mbridge bridge with the local-spec name mappings and our layer-spec choice."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    # mbridge routes names containing ".self_attention." to the attention table, other names containing
    # "mlp" to the MLP table and the rest to the "other" table: the local input norm lands in "other".
    other = {**base._OTHER_MAPPING, **LOCAL_SPEC_ATTENTION_NAMES}
    mlp = {**base._MLP_MAPPING, **LOCAL_SPEC_MLP_NAMES}

    def _get_transformer_layer_spec(self, vp_stage=None):
        self.has_vp_stage = True
        spec = get_gpt_decoder_block_spec(self.config, use_transformer_engine=use_te, vp_stage=vp_stage)
        if not use_te:
            from megatron.core.transformer.torch_norm import WrappedTorchNorm

            spec = replace_in_spec(spec, WrappedTorchNorm, SequenceParallelTorchNorm)
        return spec

    return type(
        f"Local{base.__name__}",
        (base,),
        {
            "_OTHER_MAPPING": other,
            "_MLP_MAPPING": mlp,
            "_DIRECT_MAPPING": dict(base._DIRECT_MAPPING),
            "_get_transformer_layer_spec": _get_transformer_layer_spec,
        },
    )


def make_bridge(hf_config: Any, cfg: MegatronTrainConfig) -> Any:
    """An mbridge bridge for ``hf_config`` using the current megatron parallel state and ``cfg``.

    Call after :func:`init_model_parallel`.
    """
    import mbridge  # noqa: F401  (importing the package registers its bridges)
    from mbridge.core.bridge import _MODEL_REGISTRY

    use_te = transformer_engine_usable() if cfg.use_transformer_engine is None else cfg.use_transformer_engine
    if cfg.parallel.context_parallel_size > 1 and not use_te:
        raise ValueError(
            "megatron.parallel.context_parallel_size > 1 needs the Transformer Engine layer spec (GPU); the local "
            "spec has no context-parallel attention"
        )
    base = _MODEL_REGISTRY[hf_config.model_type]
    bridge = _adapted_bridge_class(base, use_te)(hf_config, dtype=cfg.dtype)
    extra = dict(_PORTABLE_CONFIG)
    extra["sequence_parallel"] = cfg.parallel.sequence_parallel
    extra["normalization"] = "RMSNorm"
    if cfg.recompute_granularity != "none":
        extra["recompute_granularity"] = cfg.recompute_granularity
        if cfg.recompute_granularity == "full":
            extra["recompute_method"] = "uniform"
            extra["recompute_num_layers"] = cfg.recompute_num_layers
    if cfg.parallel.virtual_pipeline_model_parallel_size is not None:
        extra["overlap_p2p_comm"] = True  # batched p2p with VPP gives silently wrong losses (docs/megatron.md)
        extra["batch_p2p_comm"] = False
    if not use_te:
        extra["attention_backend"] = "local"
    bridge.set_extra_args(**extra)
    return bridge


def init_model_parallel(cfg: MegatronTrainConfig, order: str = "tp-cp-ep-dp-pp") -> int:
    """Initialise megatron's model-parallel groups and RNG on an initialised ``torch.distributed``.

    Args:
        cfg: backend config (parallel sizes, seed).
        order: megatron rank order, innermost first (megatron's default puts PP outermost; the OpenRLHF actor
            uses ``tp-cp-ep-pp-dp`` so one data-parallel replica is a block of consecutive ranks).

    Returns the data-parallel size.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("megatron: torch.distributed must be initialised before init_model_parallel")
    p = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        order=order,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    return parallel_state.get_data_parallel_world_size()


def model_device(model: MegatronModel) -> Any:
    """The device of this rank's model (its first parameter): the current GPU on GPUs; batches go there."""
    return next(model.chunks[0].parameters()).device


@dataclass
class MegatronModel:
    """A (possibly VPP-chunked, DDP-wrapped) Megatron GPT model and the bridge that converts its weights."""

    chunks: list[Any]
    """Model chunks of this rank (one per virtual pipeline stage); DDP/Float16 wrapped when training."""
    bridge: Any
    """The adapted mbridge bridge (HF names <-> Megatron names)."""
    hf_config: Any
    """The HF config the model was built from."""
    cfg: MegatronTrainConfig
    """The backend config."""

    @property
    def config(self) -> Any:
        """megatron TransformerConfig."""
        return self.bridge.config


def build_model(
    hf_path: str,
    cfg: MegatronTrainConfig,
    *,
    wrap_for_training: bool = True,
    load_weights: bool = True,
) -> MegatronModel:
    """Build this rank's GPTModel chunks for ``hf_path``'s architecture and load its HF weights.

    Args:
        hf_path: HF checkpoint directory (config.json + safetensors).
        cfg: backend config (parallel layout, precision, recompute, layer spec).
        wrap_for_training: wrap chunks in megatron DDP (grad buffers, distributed optimizer support) and,
            for bf16/fp16, ``Float16Module``; False gives bare chunks for inference (reference model).
        load_weights: load the HF weights (False keeps random init, e.g. before loading a checkpoint).
    """
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    hf_config = load_hf_config(hf_path)
    cfg.parallel.validate(torch.distributed.get_world_size(), hf_config.num_hidden_layers)
    bridge = make_bridge(hf_config, cfg)
    provider = bridge._model_provider([])
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp is not None else None
        pre = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = provider(pre_process=pre, post_process=post, vp_stage=vp_stage)
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        # megatron allocates its own layers on the current GPU, but modules it takes from torch (the local spec's
        # norms) are created on the CPU: move the whole chunk, as mbridge's get_model does
        chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    if load_weights:
        bridge.load_weights(chunks, hf_path)
    if wrap_for_training:
        chunks = _wrap_ddp(chunks, bridge.config, cfg)
    return MegatronModel(chunks=chunks, bridge=bridge, hf_config=hf_config, cfg=cfg)


def _wrap_ddp(chunks: list[Any], tconfig: Any, cfg: MegatronTrainConfig) -> list[Any]:
    """Wrap chunks in Float16Module (bf16/fp16) and megatron DDP (contiguous grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        if cfg.precision != "fp32":
            chunk = Float16Module(tconfig, chunk)
        wrapped.append(
            DistributedDataParallel(
                config=tconfig,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def iter_hf_weights(model: MegatronModel):
    """Yield ``(hf_name, full_tensor)`` for the whole model on every rank.

    Shards are gathered rank by rank: each parameter is broadcast from the pipeline stage that owns it and
    all-gathered over the TP group (mbridge's exporter), then split into HF tensors (q/k/v, gate/up).
    """
    yield from model.bridge.export_weights(model.chunks)


def export_hf(model: MegatronModel, out_dir: str) -> None:
    """Write an HF checkpoint (safetensors + config.json) loadable by ``transformers``; rank 0 writes.

    All ranks must call it (the gather is collective).
    """
    import torch
    from safetensors.torch import save_file

    rank = torch.distributed.get_rank()
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.hf_config, "tie_word_embeddings", False))
    for name, tensor in iter_hf_weights(model):
        if rank == 0:
            if tied and name == "lm_head.weight":
                continue
            tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        model.hf_config.save_pretrained(out_dir)
    torch.distributed.barrier()
