"""HF transformers rollout engine: batched, left-padded, KV-cached sampling with exact stop-string boundaries.

We run our own decoding loop instead of ``model.generate`` because the trainer needs three things ``generate``
does not give cleanly: (1) the sampled ids exactly as sampled, cut right after the token that completes a stop
string (``generate``'s ``stop_strings`` needs the tokenizer at call time and pads finished rows), (2) the
log-probability of each sampled token under the sampling distribution, (3) finished rows dropped from the batch
(and from the KV cache) as soon as they stop, which matters in multi-turn search where most rows stop at
``</search>`` long before ``max_new_tokens``.

Works on CPU and GPU. The engine holds a *reference* to the policy module: in the local trainer the policy and the
engine share weights, so :meth:`HFEngine.update_weights` only swaps the reference (no copy). Its sampler
(``torch.Generator``) lives on the model's device: torch on a GPU refuses a CPU generator for CUDA probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

from openrlhf_search.rollout.base import Generation, SamplingParams, match_stop_string


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids


def _cache_keyword(model) -> str:
    """The forward keyword that takes the KV cache: ``cache`` in transformers >= 5.2x, ``past_key_values`` before.

    transformers renamed it (``past_key_values`` now warns "deprecated ... use cache instead" on every call, which
    flooded the training terminal once per decoding step); older releases (e.g. 5.17 on the GPU image) only know
    ``past_key_values``. Reading the signature once keeps both working without a warning.
    """
    import inspect

    base = getattr(model, "get_base_model", None)  # a peft model forwards **kwargs to its base model
    try:
        params = inspect.signature((base() if callable(base) else model).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _keep_last_logits(model) -> dict:
    """``{"logits_to_keep": 1}`` when the model's forward takes it, else ``{}``.

    The prefill only needs the last position's logits; without this a causal LM returns ``[B, T, V]`` float logits
    for the whole prompt (SmolLM2's vocabulary is 49,152: 64 prompts of 600 tokens are 7.5 GB in float32), which is
    the peak of a rollout's memory.
    """
    import inspect

    base = getattr(model, "get_base_model", None)
    try:
        params = inspect.signature((base() if callable(base) else model).forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _output_cache(res):
    """The KV cache of a forward output (``cache`` in new transformers, ``past_key_values`` in older ones)."""
    cache = getattr(res, "cache", None)
    return cache if cache is not None else res.past_key_values


def sample_next(logits, params: SamplingParams, generator):
    """Sample one token per row.

    Args:
        logits: ``[B, V]`` float32 next-token logits.
        params: temperature (``0`` = greedy) and ``top_p``.
        generator: a ``torch.Generator`` on the logits' device.

    Returns:
        ``(tokens[B], logprobs[B])``: the sampled ids and their log-probs under ``softmax(logits / T)`` (before the
        top-p truncation, which only restricts the support; greedy uses ``T = 1``).
    """
    import torch

    if params.temperature <= 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logp.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / params.temperature, dim=-1)
    probs = logp.exp()
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class HFEngine:
    """Batched sampling from a ``transformers`` causal LM.

    Args:
        model: a ``PreTrainedModel`` (any causal LM with a KV cache).
        tokenizer: its tokenizer (used to decode for stop strings and for pad/EOS ids).
        max_batch_size: prompts are processed in chunks of this size.
        seed: seed of the engine's own sampler (used when ``SamplingParams.seed`` is ``None``), a
            ``torch.Generator`` on the model's device (recreated with this seed if the model moves to another device).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 64, seed: int = 0):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.seed = seed
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def update_weights(self, model) -> None:
        """Sample from ``model`` from now on (the local trainer passes the policy itself: no copy is made)."""
        import torch

        self.model = model
        if self.generator.device.type != self.device.type:  # the sampler follows the model
            self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def get_rng_state(self):
        return self.generator.get_state()

    def set_rng_state(self, state) -> None:
        self.generator.set_state(state)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 row_max_new_tokens: Sequence[int] | None = None) -> list[Generation]:
        """Continue each prompt; see :mod:`openrlhf_search.rollout.base` for the stop rule.

        ``row_max_new_tokens`` optionally gives each row its own budget (``<= params.max_new_tokens``); a row that
        reaches it finishes with ``"length"``.
        """
        import torch

        gen = self.generator
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        out: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                limits = list(row_max_new_tokens) if row_max_new_tokens is not None else None
                if limits is not None and len(limits) != len(prompts):
                    raise ValueError(f"row_max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
                for i in range(0, len(prompts), self.max_batch_size):
                    lim = limits[i : i + self.max_batch_size] if limits is not None else None
                    out.extend(self._generate_batch(prompts[i : i + self.max_batch_size], params, gen, lim))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts, params: SamplingParams, generator, limits=None) -> list[Generation]:
        import torch

        device = self.device
        n = len(prompts)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFEngine.generate: every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attn[i, width - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        res = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                         **_keep_last_logits(self.model))
        cache, logits = _output_cache(res), res.logits[:, -1, :].float()
        del res  # the output holds the prefill's logits (all positions when the model cannot keep only the last)
        cache_kw = _cache_keyword(self.model)
        next_pos = pos[:, -1] + 1

        tokens_out: list[list[int]] = [[] for _ in range(n)]
        logps_out: list[list[float]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        stops: list[str | None] = [None] * n
        texts = [""] * n
        alive = list(range(n))  # original row index of each row still in the batch
        limits = [min(params.max_new_tokens, x) for x in limits] if limits is not None else [params.max_new_tokens] * n
        for _ in range(params.max_new_tokens):
            tok, lp = sample_next(logits, params, generator)
            tok_l, lp_l = tok.tolist(), lp.tolist()
            keep: list[int] = []
            for r, row in enumerate(alive):
                t = tok_l[r]
                tokens_out[row].append(t)
                logps_out[row].append(lp_l[r])
                if t in self.eos_ids:
                    reasons[row] = "eos"
                    continue
                if params.stop_strings:
                    text = self.tokenizer.decode(tokens_out[row], skip_special_tokens=False)
                    hit = match_stop_string(text, params.stop_strings, len(text) - len(texts[row]))
                    texts[row] = text
                    if hit is not None:
                        reasons[row], stops[row] = "stop", hit
                        continue
                if len(tokens_out[row]) >= limits[row]:
                    continue  # finish_reason stays "length"
                keep.append(r)
            if not keep:
                break
            if len(keep) < len(alive):  # drop finished rows from the batch and the cache
                sel = torch.tensor(keep, device=device)
                cache = _select_cache(cache, sel)
                attn, next_pos, tok = attn[sel], next_pos[sel], tok[sel]
                alive = [alive[r] for r in keep]
            attn = torch.cat([attn, attn.new_ones((len(alive), 1))], dim=1)
            res = self.model(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_kw: cache},
            )
            cache, logits = _output_cache(res), res.logits[:, -1, :].float()
            next_pos = next_pos + 1
        return [Generation(tokens_out[i], logps_out[i], reasons[i], stops[i]) for i in range(n)]


def _select_cache(cache, sel):
    """Keep rows ``sel`` of a KV cache (``DynamicCache`` or legacy tuples)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(sel)
        return cache
    if hasattr(cache, "layers"):  # transformers >= 5 DynamicCache without the helper
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[sel], layer.values[sel]
        return cache
    return tuple(tuple(t[sel] for t in layer) for layer in cache)
