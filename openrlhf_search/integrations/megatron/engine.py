"""Forward (log-probs) and training steps of a Megatron GPT model through megatron's pipeline schedules.

Batches are OpenRLHF-style padded token matrices: ``input_ids[B, S]`` with ``attention_mask[B, S]`` (1 = real
token, left and/or right padding allowed). Per-token training tensors are aligned with *next-token*
positions, ``[B, S-1]``: column ``t`` scores ``input_ids[:, t+1]`` (OpenRLHF keeps the last ``num_actions``
columns; this module takes the full ``S-1`` width and an ``action_mask`` with zeros elsewhere).

Each micro-batch runs ``GPTModel(input_ids, position_ids, mask)``; on the last pipeline stage the TP-sharded
logits go straight into :func:`..logprobs.next_token_logprobs_entropy` (never gathering the vocabulary) and,
for training, into a registry policy loss ``fn(log_probs, old_log_probs, advantages, action_mask, **extra)``.
Loss normalisation (the contract of :mod:`openrlhf_search.algorithms.losses`): :func:`train_step` computes the
step's global normalisers -- the counts the loss asks for (``PolicyLoss.normalizers``: model tokens or sequences,
plus e.g. SAPO's count), summed over all micro-batches and all-reduced over the data-parallel group
(:func:`~openrlhf_search.algorithms.losses.step_normalizers`) -- and passes them to every micro-batch's loss, whose
value is then its share ``local sum / global count``. megatron's schedule divides each micro-batch loss by the
number of micro-batches and DDP averages gradients over data-parallel ranks; the loss is multiplied by
``num_microbatches x dp_size`` to cancel both, so the gradient is that of the global objective on any layout and
any micro-batch size (``token-mean`` is one mean over the step's tokens, not a mean of micro-batch means).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from openrlhf_search.algorithms.losses import ADDITIVE_METRICS, PolicyLoss, step_normalizers
from openrlhf_search.integrations.megatron.logprobs import next_token_logprobs_entropy
from openrlhf_search.integrations.megatron.model import MegatronModel, model_device

logger = logging.getLogger(__name__)

TOKEN_KEYS = ("old_log_probs", "advantages", "action_mask", "ref_log_probs")
"""Optional per-token ``[B, S-1]`` tensors a training batch may carry (sliced with the micro-batches)."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` positions counting real tokens only (left padding gets position 0), as HF/OpenRLHF do."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def megatron_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, S, S]`` mask for megatron attention, True = *masked out*: causal and key padding.

    Rows of padding queries keep their diagonal so their softmax stays finite (their outputs are ignored).
    """
    s = attention_mask.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool, device=attention_mask.device)[None]
    return (~allowed)[:, None]


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Right-pad the sequence axis to a multiple (sequence parallel needs ``S % TP == 0``); mask = 0."""
    s = batch["input_ids"].shape[1]
    extra = (-s) % multiple
    if not extra:
        return batch
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
            continue
        pad = torch.zeros(value.shape[0], extra, dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, pad], dim=1)
    return out


def split_micro_batches(batch: dict[str, torch.Tensor | None], micro_batch_size: int) -> list[dict[str, Any]]:
    """Split every ``[B, ...]`` tensor of ``batch`` into consecutive micro-batches of ``micro_batch_size`` rows."""
    b = batch["input_ids"].shape[0]
    if micro_batch_size < 1 or b % micro_batch_size:
        raise ValueError(f"megatron: batch of {b} sequences is not divisible by micro_batch_size={micro_batch_size}")
    return [
        {k: (v[i : i + micro_batch_size] if v is not None else None) for k, v in batch.items()}
        for i in range(0, b, micro_batch_size)
    ]


@dataclass
class StepResult:
    """Outcome of one optimizer step (identical on every rank)."""

    loss: float
    """The step's policy loss (with a registry loss: the global objective; else the mean of micro-batch losses)."""
    grad_norm: float
    """Global L2 norm of the gradient before clipping (over all TP/PP/DP shards)."""
    update_successful: bool
    """False when the step was skipped (fp16 overflow)."""
    metrics: dict[str, float]
    """Loss metrics averaged like ``loss``."""


def _chunk_inputs(mb: dict[str, Any]) -> dict[str, torch.Tensor]:
    mask = mb["attention_mask"]
    return {
        "input_ids": mb["input_ids"],
        "position_ids": position_ids_from_mask(mask),
        "attention_mask": megatron_attention_mask(mask),
    }


def _run_schedule(
    model: MegatronModel,
    micro_batches: list[dict[str, Any]],
    loss_from_logits: Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    forward_only: bool,
) -> list[dict[str, torch.Tensor]]:
    """Run megatron's forward(-backward) schedule; returns the per-micro-batch dicts on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        output = chunk(**_chunk_inputs(mb))

        def loss_func(logits):
            return loss_from_logits(logits, mb)

        return output, loss_func

    n_chunks = len(model.chunks)
    iterators = [iter(micro_batches) for _ in range(n_chunks)] if n_chunks > 1 else iter(micro_batches)
    s = micro_batches[0]["input_ids"].shape[1]
    fb = get_forward_backward_func()
    return fb(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=model.chunks if n_chunks > 1 else model.chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=micro_batches[0]["input_ids"].shape[0],
        forward_only=forward_only,
    )


def _prepare(model: MegatronModel, batch: dict[str, torch.Tensor | None]) -> tuple[list[dict[str, Any]], int]:
    s = batch["input_ids"].shape[1]
    multiple = model.cfg.parallel.tensor_model_parallel_size if model.config.sequence_parallel else 1
    padded = pad_to_multiple(batch, multiple)
    return split_micro_batches(padded, model.cfg.micro_batch_size), s


def _broadcast_from_last_stage(t: torch.Tensor | None, shape: tuple[int, ...], device: Any) -> torch.Tensor:
    """Send a tensor that exists on the last pipeline stage to every stage of this PP group (NCCL: on ``device``,
    the GPU)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        assert t is not None
        return t
    if t is None:
        t = torch.empty(shape, dtype=torch.float32, device=device)
    dist.broadcast(t, src=mpu.get_pipeline_model_parallel_last_rank(), group=mpu.get_pipeline_model_parallel_group())
    return t


@torch.no_grad()
def compute_logprobs(
    model: MegatronModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs and entropies ``[B, S-1]`` (float32, on the model's device) on every rank of the
    model-parallel group. The inputs may be on any device (they are moved to the model's).

    Positions whose target token is padding hold meaningless values; mask them with
    ``attention_mask[:, 1:]`` (or the action mask).
    """
    for chunk in model.chunks:
        chunk.eval()
    device = model_device(model)
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    micro_batches, s = _prepare(model, batch)

    def loss_from_logits(logits, mb):
        logp, ent = next_token_logprobs_entropy(logits, mb["input_ids"], temperature)
        return logits.new_zeros(()), {"log_probs": logp, "entropy": ent}

    outputs = _run_schedule(model, micro_batches, loss_from_logits, forward_only=True)
    b = input_ids.shape[0]
    shape = (2, b, micro_batches[0]["input_ids"].shape[1] - 1)
    stacked = None
    if outputs:
        logp = torch.cat([o["log_probs"] for o in outputs])
        ent = torch.cat([o["entropy"] for o in outputs])
        stacked = torch.stack([logp, ent]).float().contiguous()
    stacked = _broadcast_from_last_stage(stacked, shape, device)
    return stacked[0, :, : s - 1], stacked[1, :, : s - 1]


def build_optimizer(model: MegatronModel) -> Any:
    """megatron Adam optimizer (distributed when configured) over the model chunks, with grad finalisation hooks.

    ``finalize_model_grads`` performs the DP all-reduce/reduce-scatter, the tied-embedding all-reduce across
    the first/last PP stages and the sequence-parallel LayerNorm all-reduce (plain AdamW would be wrong).
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = model.cfg
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        params_dtype=cfg.dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    tconfig = model.config
    tconfig.finalize_model_grads_func = finalize_model_grads
    no_sync = [c.no_sync for c in model.chunks]
    tconfig.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
    optimizer = get_megatron_optimizer(opt_config, model.chunks)
    tconfig.grad_scale_func = optimizer.scale_loss
    return optimizer


def step_loss_normalizers(micro_batches: list[dict[str, Any]], loss_fn: Callable[..., Any]) -> tuple[dict, float]:
    """``(normalizer kwargs, loss scale)`` of one optimizer step over this rank's ``micro_batches``.

    The kwargs are the counts the loss asks for (:meth:`~openrlhf_search.algorithms.losses.PolicyLoss.normalizers`),
    summed over the step and all-reduced over the data-parallel group (every DP rank calls this); the scale
    ``num_microbatches x dp_size`` cancels megatron's averaging. A loss that asks for none (or a bare callable)
    gets no kwargs and scale 1: megatron's mean of micro-batch means.
    """
    from megatron.core import parallel_state as mpu

    if not isinstance(loss_fn, PolicyLoss):
        return {}, 1.0
    pairs = [(mb["action_mask"][:, :-1], mb["advantages"][:, :-1]) for mb in micro_batches]
    device = pairs[0][0].device  # the model's (train_step moves the batch there): NCCL needs the GPU
    norms = step_normalizers(pairs, loss_fn, group=mpu.get_data_parallel_group(), device=device)
    if not norms:
        return {}, 1.0
    return norms, float(len(micro_batches) * mpu.get_data_parallel_world_size())


def train_step(
    model: MegatronModel,
    optimizer: Any,
    batch: dict[str, torch.Tensor | None],
    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, Any]]],
    temperature: float = 1.0,
) -> StepResult:
    """One optimizer step of a registry policy loss over ``batch`` (this data-parallel rank's share).

    Args:
        model: training model from :func:`..model.build_model` (DDP-wrapped).
        optimizer: from :func:`build_optimizer`.
        batch: ``input_ids``/``attention_mask`` ``[B, S]`` plus ``old_log_probs``, ``advantages``,
            ``action_mask`` and optionally ``ref_log_probs``, each ``[B, S-1]`` (advantages may be ``[B]``).
        loss_fn: ``fn(log_probs, old_log_probs, advantages, action_mask, *, entropy=, ref_log_probs=)`` from
            ``openrlhf_search.algorithms.get_policy_loss``.
        temperature: rollout temperature.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    for key in ("old_log_probs", "advantages", "action_mask"):
        if batch.get(key) is None:
            raise ValueError(f"megatron.train_step: batch is missing {key!r}")
    device = model_device(model)
    batch = {k: (v.to(device) if v is not None else None) for k, v in batch.items()}
    if batch["advantages"].dim() == 1:
        batch["advantages"] = batch["advantages"][:, None].expand_as(batch["old_log_probs"]).contiguous()
    # per-token tensors are [B, S-1]; pad them to [B, S] so they split/pad like input_ids.
    for key in TOKEN_KEYS:
        if batch.get(key) is not None:
            t = batch[key]
            batch[key] = torch.cat([t, t.new_zeros(t.shape[0], 1)], dim=1)
    for chunk in model.chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    micro_batches, s = _prepare(model, batch)
    norms, scale = step_loss_normalizers(micro_batches, loss_fn)

    def loss_from_logits(logits, mb):
        logp, ent = next_token_logprobs_entropy(logits, mb["input_ids"], temperature)
        extra = {"entropy": ent}
        if mb.get("ref_log_probs") is not None:
            extra["ref_log_probs"] = mb["ref_log_probs"][:, :-1]
        loss, metrics = loss_fn(
            logp,
            mb["old_log_probs"][:, :-1].float(),
            mb["advantages"][:, :-1].float(),
            mb["action_mask"][:, :-1],
            **extra,
            **norms,
        )
        loss = loss * scale  # cancels the schedule's 1/num_microbatches and DDP's 1/dp_size (module docstring)
        reported = {"loss": loss.detach().clone()}
        for k, v in (metrics or {}).items():
            # shares of the step's value (ADDITIVE_METRICS) are scaled like the loss: their mean is then their sum
            factor = scale if (norms and k in ADDITIVE_METRICS) else 1.0
            if torch.is_tensor(v) and v.numel() == 1:
                reported[k] = v.detach().float().reshape(()) * factor
            elif isinstance(v, (int, float)):
                reported[k] = torch.tensor(float(v) * factor, device=device)
        return loss, reported

    outputs = _run_schedule(model, micro_batches, loss_from_logits, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    # average metrics over micro-batches, then over DP; send from the last PP stage to all stages.
    keys = sorted(outputs[0]) if outputs else None
    keys = _broadcast_object_from_last_stage(keys)
    vec = None
    if outputs:
        vec = torch.stack([torch.stack([o[k].float() for k in keys]) for o in outputs]).mean(0)
    vec = _broadcast_from_last_stage(vec, (len(keys),), device)
    dist.all_reduce(vec, group=mpu.get_data_parallel_group())
    vec /= mpu.get_data_parallel_world_size()
    values = dict(zip(keys, vec.tolist(), strict=True))
    return StepResult(
        loss=values.pop("loss"),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_successful=bool(update_successful),
        metrics=values,
    )


def _broadcast_object_from_last_stage(obj: Any) -> Any:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(
        holder, src=mpu.get_pipeline_model_parallel_last_rank(), group=mpu.get_pipeline_model_parallel_group()
    )
    return holder[0]
