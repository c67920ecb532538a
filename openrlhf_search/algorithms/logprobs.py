"""Log-probs and entropies of sampled tokens without a full ``[B, T, V]`` float32 log-softmax.

With Qwen2.5's 151,936-token vocabulary, one ``[2, 4096, V]`` float32 tensor is 4.98 GB; the textbook
``logits.log_softmax(-1).gather(...)`` holds two of them (logits and log-softmax), and autograd keeps more for
backward. Only ``B*T`` numbers are wanted. Three helpers, all processing rows of the flattened ``B*T`` axis in
chunks and upcasting one chunk at a time to float32:

* :func:`logprobs_from_logits` -- when the model already produced logits: ``logit[y] - logsumexp(logit)`` per
  chunk. Differentiable; for non-float32 logits or a temperature each chunk is recomputed in backward
  (``torch.utils.checkpoint``) so the float32 copies are never all alive at once.
* :func:`entropy_from_logits` -- ``H = logsumexp(z) - sum softmax(z) z`` per chunk, likewise.
* :func:`sampled_token_logprobs` -- best: from the last hidden states and the LM-head weight, never materialising
  the logits at all. A custom ``autograd.Function`` computes ``z = (h W^T + b) / temperature`` chunk by chunk,
  keeps only the per-row ``logsumexp`` (and entropy), and in backward recomputes each chunk's logits to form
  ``dL/dz = g (onehot(y) - p) - g_H p (z - E_p[z])`` and accumulate ``dh = dz W`` and ``dW = dz^T h``.
  Arithmetic is float32 (float64 for float64 inputs). Peak memory is ``O(chunk_size * V)`` in both
  directions instead of ``O(B T V)``. Measured in
  ``benchmarks/logprob_memory.py`` (see ``benchmarks/README.md``).

All take ``chunk_size`` in rows of the flattened ``B*T`` axis; the default (None) picks the largest chunk whose
float32 logits stay under ``DEFAULT_CHUNK_BYTES`` (128 MiB), i.e. ~220 rows at V=151,936.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024


def _auto_chunk(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    return max(16, DEFAULT_CHUNK_BYTES // (4 * max(vocab, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16/fp32 inputs, float64 for float64 inputs (exact checks in tests)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    z = logits.to(_compute_dtype(logits.dtype))
    return z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _chunk_entropy(logits: torch.Tensor) -> torch.Tensor:
    z = logits.to(_compute_dtype(logits.dtype))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    return lse.squeeze(-1) - (p * z).sum(-1)


def _checked_targets(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    targets = targets.long()
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(
            f"targets must be token ids in [0, {vocab}); got min {int(targets.min())}, max {int(targets.max())}"
        )
    return targets


def logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """``log softmax(logits / temperature)[targets]`` computed in row chunks; returns float32 ``[B, T]``.

    Args:
        logits: ``[B, T, V]`` (any float dtype).
        targets: ``[B, T]`` sampled token ids.
        chunk_size: rows of the flattened ``B*T`` axis per chunk (None: auto, see module docstring).
        temperature: sampling temperature the rollout used (log-probs must match the sampler's).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and targets [B, T]; got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")  # fmt: skip
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    tgt = _checked_targets(targets.reshape(B * T), V)
    step = _auto_chunk(V, chunk_size)
    # A cast or a temperature creates a chunk-sized copy that autograd would keep: recompute those in backward.
    copies = _compute_dtype(logits.dtype) != logits.dtype or temperature != 1.0
    recompute = torch.is_grad_enabled() and logits.requires_grad and copies
    out = []
    for s in range(0, B * T, step):
        chunk = flat[s : s + step]
        if temperature != 1.0:
            chunk = chunk / temperature
        if recompute:
            out.append(checkpoint(_chunk_logprobs, chunk, tgt[s : s + step], use_reentrant=False))
        else:
            out.append(_chunk_logprobs(chunk, tgt[s : s + step]))
    return (torch.cat(out) if out else flat.new_zeros(0, dtype=_compute_dtype(flat.dtype))).reshape(B, T)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Token entropy of ``softmax(logits / temperature)`` in row chunks; returns float32 ``[B, T]``.

    In grad mode each chunk is recomputed in backward (the softmax of all chunks is never kept).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {tuple(logits.shape)}")
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    step = _auto_chunk(V, chunk_size)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    out = []
    for s in range(0, B * T, step):
        chunk = flat[s : s + step]
        if temperature != 1.0:
            chunk = chunk / temperature
        out.append(checkpoint(_chunk_entropy, chunk, use_reentrant=False) if recompute else _chunk_entropy(chunk))
    return (torch.cat(out) if out else flat.new_zeros(0, dtype=_compute_dtype(flat.dtype))).reshape(B, T)


class _FusedLinearLogProb(torch.autograd.Function):
    """Chunked ``log_softmax(h W^T + b)[y]`` (and entropy) with recomputation in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, want_entropy):
        N = hidden.shape[0]
        cdt = _compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        logp = torch.empty(N, dtype=cdt, device=hidden.device)
        lse = torch.empty(N, dtype=cdt, device=hidden.device)
        ent = torch.empty(N if want_entropy else 0, dtype=cdt, device=hidden.device)
        mean_z = torch.empty(N if want_entropy else 0, dtype=cdt, device=hidden.device)
        w = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        for s in range(0, N, chunk):
            z = _chunk_logits(hidden[s : s + chunk], w, b, temperature)
            c_lse = torch.logsumexp(z, dim=-1)
            lse[s : s + chunk] = c_lse
            logp[s : s + chunk] = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - c_lse
            if want_entropy:
                p = torch.sub(z, c_lse[:, None]).exp_()  # one more chunk-sized buffer
                ez = torch.bmm(p[:, None, :], z[:, :, None]).reshape(-1)  # E_p[z] without a p*z temporary
                mean_z[s : s + chunk] = ez
                ent[s : s + chunk] = c_lse - ez
                del p
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mean_z)
        ctx.temperature, ctx.chunk, ctx.want_entropy = temperature, chunk, want_entropy
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, mean_z = ctx.saved_tensors
        temperature, chunk, want_entropy = ctx.temperature, ctx.chunk, ctx.want_entropy
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        cdt = lse.dtype
        w = weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        grad_h = torch.zeros_like(hidden, dtype=cdt) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros_like(b) if (need_b and b is not None) else None
        use_ent = want_entropy and g_ent is not None and g_ent.numel() > 0
        N = hidden.shape[0]
        for s in range(0, N, chunk):
            h = hidden[s : s + chunk]
            z = _chunk_logits(h, w, b, temperature)
            g = g_logp[s : s + chunk].to(cdt) if g_logp is not None else z.new_zeros(z.shape[0])
            if use_ent:
                # dH/dz = -p (z - E_p[z]); build it in the z buffer before z is overwritten by p.
                p = torch.sub(z, lse[s : s + chunk, None]).exp_()
                # z <- -g - g_H (z - E[z]) in place, then dz = p * z
                z.sub_(mean_z[s : s + chunk, None]).mul_(-g_ent[s : s + chunk, None].to(cdt)).sub_(g[:, None])
                dz = p.mul_(z)
                del p
            else:
                dz = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])  # -g p, in place
            dz.scatter_add_(-1, targets[s : s + chunk, None], g[:, None])  # + g onehot(y)
            if temperature != 1.0:
                dz.div_(temperature)
            if need_h:
                grad_h[s : s + chunk] = dz @ w
            if need_w:
                grad_w.addmm_(dz.t(), h.to(cdt))
            if grad_b is not None:
                grad_b += dz.sum(0)
            del dz, z
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
        )


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    z = torch.addmm(b, h.to(w.dtype), w.t()) if b is not None else h.to(w.dtype) @ w.t()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def sampled_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
):
    """Log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``, never holding ``[B,T,V]``.

    Args:
        hidden: ``[B, T, H]`` last hidden states (after the final norm), aligned with ``targets`` (i.e. already
            shifted: ``hidden[:, t]`` predicts ``targets[:, t]``).
        weight: ``[V, H]`` LM-head weight (tied embeddings work: pass the embedding matrix).
        targets: ``[B, T]`` sampled token ids.
        bias: optional ``[V]`` LM-head bias.
        temperature: the sampler's temperature.
        chunk_size: rows of ``B*T`` per chunk (None: auto, ~128 MiB of float32 logits per chunk).
        return_entropy: also return the ``[B, T]`` token entropies (differentiable).
    Returns:
        ``[B, T]`` log-probs, or ``(log_probs, entropy)`` when ``return_entropy``; float32 (float64 for
        float64 inputs) whatever the input dtype. Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and targets [B, T]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}")  # fmt: skip
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, H={hidden.shape[2]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, H = hidden.shape
    V = weight.shape[0]
    tgt = _checked_targets(targets.reshape(B * T), V)
    chunk = _auto_chunk(V, chunk_size)
    logp, ent = _FusedLinearLogProb.apply(
        hidden.reshape(B * T, H), weight, bias, tgt, float(temperature), chunk, bool(return_entropy)
    )
    logp = logp.reshape(B, T)
    return (logp, ent.reshape(B, T)) if return_entropy else logp
