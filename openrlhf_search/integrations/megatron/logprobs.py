"""Log-probabilities and entropies of sampled tokens from vocabulary-parallel logits.

With tensor parallelism the LM head is column-parallel: TP rank ``r`` holds logits ``z[..., V_r]`` for its
vocabulary slice ``[r V/tp, (r+1) V/tp)``. Gathering ``[B, T, V]`` on one rank (152k vocab for Qwen2.5) is the
memory spike this module avoids. For each row, with ``m = max_v z_v`` (all-reduce MAX) and
``S = sum_v exp(z_v - m)`` (all-reduce SUM of the local sums)::

    log p(y) = z_y - m - log S                                  (z_y all-reduced from the owning rank)
    H        = log S - sum_v p_v (z_v - m)                      (the sum all-reduced)

Backward needs no communication: ``d log p(y) / d z_v = 1[v = y] - p_v`` and
``d H / d z_v = -p_v (log p_v + H)``, both local to the rank owning ``v`` once ``m``, ``S`` and ``H`` are known
(Megatron-LM's ``vocab_parallel_cross_entropy`` uses the same decomposition for the loss; this version adds the
entropy and its gradient, which the registry losses' entropy bonus needs). Arithmetic is float32.
"""

from __future__ import annotations

from typing import Any

import torch


def _all_reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    import torch.distributed as dist

    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Autograd function: ``(z_local[N, V_r], y[N]) -> (log p(y)[N], H[N])`` across the TP group."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):  # noqa: D417
        import torch.distributed as dist

        z = logits.float()
        m = z.max(dim=-1).values
        _all_reduce(m, dist.ReduceOp.MAX, group)
        shifted = z - m.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        vocab_local = z.shape[-1]
        local_target = target - vocab_start
        in_range = (local_target >= 0) & (local_target < vocab_local)
        picked = shifted.gather(-1, local_target.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(in_range, picked, torch.zeros_like(picked))
        _all_reduce(picked, dist.ReduceOp.SUM, group)
        log_sum = sum_exp.log()
        probs = exp / sum_exp.unsqueeze(-1)
        weighted = (probs * shifted).sum(-1)
        _all_reduce(weighted, dist.ReduceOp.SUM, group)
        logp = picked - log_sum
        entropy = log_sum - weighted
        ctx.save_for_backward(probs, shifted, log_sum, entropy, local_target, in_range)
        ctx.input_dtype = logits.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        probs, shifted, log_sum, entropy, local_target, in_range = ctx.saved_tensors
        grad = torch.zeros_like(probs)
        if grad_logp is not None:
            grad = grad - probs * grad_logp.unsqueeze(-1)
            rows = torch.nonzero(in_range, as_tuple=True)[0]
            grad[rows, local_target[rows]] += grad_logp[rows]
        if grad_entropy is not None:
            log_p = shifted - log_sum.unsqueeze(-1)
            grad = grad - grad_entropy.unsqueeze(-1) * probs * (log_p + entropy.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int = 0,
    group: Any = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token log-probs and full-distribution entropies from a vocabulary shard.

    Args:
        logits: ``[..., V_r]`` logits of this rank's vocabulary slice (any float dtype).
        targets: ``[...]`` global token ids (each owned by exactly one rank of ``group``).
        vocab_start: first global token id of this rank's slice.
        group: the tensor-parallel process group (None or size 1: the full vocabulary is local).
        temperature: the sampler's temperature; logits are divided by it first.

    Returns:
        ``(log_probs, entropy)``, float32, shaped like ``targets``; differentiable w.r.t. ``logits``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} plus a vocab dim")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    if temperature != 1.0:
        flat = flat / temperature
    logp, ent = _VocabParallelLogprobEntropy.apply(flat, targets.reshape(-1).long(), int(vocab_start), group)
    return logp.view(lead), ent.view(lead)


def megatron_tp_logprobs_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vocab_parallel_logprobs_entropy` over megatron's current TP group and vocabulary slice."""
    from megatron.core import parallel_state as mpu

    rank = mpu.get_tensor_model_parallel_rank()
    return vocab_parallel_logprobs_entropy(
        logits,
        targets,
        vocab_start=rank * logits.shape[-1],
        group=mpu.get_tensor_model_parallel_group(),
        temperature=temperature,
    )


def next_token_logprobs_entropy(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs/entropies of ``input_ids[:, 1:]`` from ``logits[:, :-1]`` (TP-sharded vocab), each ``[B, T-1]``.

    Position ``t`` of the result scores token ``t + 1`` (OpenRLHF's convention before it keeps the last
    ``num_actions`` columns as the action log-probs).
    """
    return megatron_tp_logprobs_entropy(logits[:, :-1], input_ids[:, 1:], temperature)
