"""Supervised warm start on demonstration trajectories (the quickstart's first phase).

A randomly initialised model cannot produce the tag protocol at all, so RL would have no signal. A short
cross-entropy pass on demonstrations (``openrlhf_search.data.synthetic.synthetic_trajectories``) teaches the format
and the search-then-answer habit; the demonstrations are imperfect on purpose (some answer without searching, some
copy a wrong entity), so the warm-started policy still makes mistakes that RL can remove.

Tokenisation mirrors the environment exactly: the prompt ids come from the environment's own ``reset``; each
demonstration segment is tokenised on its own (model segments as the model would sample them, observation segments
as the environment tokenises observations), and only model segments carry loss.

On real questions (``sft.demonstrations: retrieved``) :func:`retrieved_demonstrations` drives the environment itself
with a scripted policy (search with the question, then answer with the golden answer the retrieved passages hold),
so prompt, observation and hint tokens are exactly the environment's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from openrlhf_search.rewards import normalize_answer, substring_exact_match
from openrlhf_search.rollout.base import Generation


@dataclass
class SFTExample:
    """One tokenised demonstration."""

    input_ids: list[int]
    """Prompt ids followed by response ids."""
    loss_mask: list[int]
    """1 on model-written response tokens (the loss targets), 0 on the prompt and on observations."""


def tokenize_demonstration(prompt_ids: list[int], segments: list[tuple[str, bool]], tokenizer,
                           eos_after: bool = False) -> SFTExample:
    """Turn ``(text, is_model)`` segments into ids and a loss mask (segments tokenised one by one)."""
    ids, mask = list(prompt_ids), [0] * len(prompt_ids)
    for text, is_model in segments:
        seg = tokenizer.encode(text, add_special_tokens=False)
        ids += seg
        mask += [1 if is_model else 0] * len(seg)
    if eos_after and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return SFTExample(ids, mask)


@dataclass
class RetrievedDemonstrations:
    """What :func:`retrieved_demonstrations` built."""

    examples: list[SFTExample]
    """One tokenised demonstration per kept question (prompt ids + the environment's response ids and mask)."""
    samples: list = field(default_factory=list)
    """The kept questions, in the order of ``examples``."""
    texts: list[str] = field(default_factory=list)
    """The decoded response of each demonstration (model turns and observations), for inspection and tests."""
    trajectories: list = field(default_factory=list)
    """The environment's finished trajectories of the kept questions (what the reward scores)."""
    counts: dict = field(default_factory=dict)
    """``questions`` given, ``kept``, ``answer_not_retrieved`` (dropped: no golden answer in the passages)."""


def _scripted(env, text: str, stop: str) -> Generation:
    ids = env.encode(text)
    return Generation(ids, [0.0] * len(ids), "stop", stop)


def _search_with_question(env, samples: list, query_prefix: str = "") -> tuple[list, list, list]:
    """Play turn 1 of every sample (search with the question itself); return ``(trajectories, kept, answers)``: the
    live trajectories whose retrieved passages hold a golden answer, and that answer (the first in data order)."""
    trajs = env.reset(samples)
    env.step(trajs, [_scripted(env, f"<search>{query_prefix}{t.meta['question'].strip()}</search>", "</search>")
                     for t in env.live(trajs)])
    kept, answers = [], []
    for t in trajs:
        hit = next((a for a in t.meta["golden_answers"] if substring_exact_match(t.retrieved_text, [a])), None)
        if hit is not None and not t.done:
            kept.append(t)
            answers.append(hit)
    return trajs, kept, answers


def answerable_questions(env, samples, batch: int = 256) -> list:
    """The ``samples`` whose golden answer appears in the passages ``env`` returns when the question itself is the
    query (``data.train_questions: answerable``; the same test :func:`retrieved_demonstrations` keeps its questions
    by), in their order. Runs in batches of ``batch`` questions."""
    samples = list(samples)
    out = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        trajs, kept, _ = _search_with_question(env, chunk)
        keep = {id(t) for t in kept}
        out.extend(s for s, t in zip(chunk, trajs) if id(t) in keep)
    return out


def select_train_questions(data_cfg, env, samples: list) -> list:
    """The training questions RL samples (``data.train_questions`` of ``data_cfg``): all of them, or the answerable
    ones (:func:`answerable_questions`). Every backend selects through this function, on an environment built from
    the same config."""
    if data_cfg.train_questions == "all":
        return samples
    kept = answerable_questions(env, samples)
    print(f"[data] data.train_questions=answerable: {len(kept)} of {len(samples)} training questions have a golden "
          "answer in the passages retrieved for the question itself", flush=True)
    if not kept:
        raise ValueError("data.train_questions=answerable: no training question has a golden answer in the passages "
                         "retrieved for it (check retriever.spec, env.topk and env.max_obs_tokens, or set "
                         "data.train_questions=all)")
    return kept


def retrieved_demonstrations(env, samples, query_prefix: str = "") -> RetrievedDemonstrations:
    """Demonstrations on real questions, played through the environment ``env`` (a
    :class:`~openrlhf_search.env.search_env.SearchEnv` of the training configuration): turn 1 searches with the
    question itself, the environment retrieves and inserts its passages, turn 2 answers with the first golden answer
    (in the order given) that those passages contain, copied as written in the data.

    Questions none of whose golden answers appears (after answer normalisation) in the retrieved passages are
    dropped: the demonstrations teach reading the evidence, never answering from nowhere. Only ``samples`` are used
    (pass the training questions: nothing of the held-out set may be shown).
    """
    samples = list(samples)
    trajs, kept, answers = _search_with_question(env, samples, query_prefix)
    env.step(kept, [_scripted(env, f"<answer>{a}</answer>", "</answer>") for a in answers])
    out = RetrievedDemonstrations([], counts={"questions": len(samples), "kept": len(kept),
                                              "answer_not_retrieved": len(samples) - len(kept)})
    by_index = {id(t): i for i, t in enumerate(trajs)}
    for t, a in zip(kept, answers):
        if not t.done or t.answer is None or normalize_answer(t.answer) != normalize_answer(a):
            raise RuntimeError(f"retrieved_demonstrations: the environment did not accept the scripted answer {a!r} "
                               f"(finish {t.finish_reason!r}, answer {t.answer!r}): template and demonstrations "
                               "disagree")
        out.examples.append(SFTExample(list(t.prompt_ids) + list(t.response_ids),
                                       [0] * len(t.prompt_ids) + list(t.action_mask)))
        out.samples.append(samples[by_index[id(t)]])
        out.texts.append(env.tokenizer.decode(t.response_ids, skip_special_tokens=False))
        out.trajectories.append(t)
    return out


def copy_examples(words: list[str], tokenizer, n: int, seed: int = 0, min_words: int = 3,
                  max_words: int = 8) -> list[SFTExample]:
    """Copy-task sequences ``"w1 ... wk\nw1 ... wk"`` with loss on the second half only.

    Why: a search agent must copy an entity from the question into its query and an answer from a retrieved passage
    into ``<answer>``. A randomly initialised transformer learns that (induction heads) only after many steps of
    next-token loss where copy targets are rare; a few hundred steps of this dense copy objective on the corpus'
    own words build the circuit first (figures in docs/trainer.md), after which the demonstrations teach the protocol
    on top of it.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(min_words, max_words))]
        src = tokenizer.encode(" ".join(ws) + "\n", add_special_tokens=False)
        dst = tokenizer.encode(" ".join(ws), add_special_tokens=False)
        out.append(SFTExample(src + dst, [0] * len(src) + [1] * len(dst)))
    return out


def sft_loss(model, batch: list[SFTExample], pad_id: int):
    """Token-mean cross-entropy over model tokens of a right-padded batch; returns ``(loss, n_tokens)``."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(e.loss_mask)
    device = next(model.parameters()).device
    ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
    targets, tmask = ids[:, 1:], mask[:, 1:].bool()
    n = int(tmask.sum().item())
    body, head = _body_and_head(model)
    if body is not None:  # logits of the loss positions only: [n, V] instead of [B, T, V]
        hidden = body(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        logits = head(hidden[tmask]).float()
        nll = torch.nn.functional.cross_entropy(logits, targets[tmask], reduction="sum")
        return nll / max(n, 1), n
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                            reduction="none").view_as(tmask)
    return (nll * tmask).sum() / max(n, 1), n


def _body_and_head(model):
    """``(decoder, lm_head)`` of a causal LM that exposes them (Llama, Qwen2, ...; not a peft wrapper), else
    ``(None, None)``. The loss then projects only the loss positions through the head: with a 49k vocabulary and
    demonstrations where a few dozen of ~400 tokens carry loss, the full ``[B, T, V]`` logits (and their float copy
    and gradient) are mostly wasted work and memory."""
    body = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None or type(model).__name__.startswith("Peft") or not callable(body):
        return None, None
    return body, head


def run_sft(model, examples: list[SFTExample], steps: int, batch_size: int, lr: float, pad_id: int, seed: int = 0,
            log=None, warmup_steps: int = 10) -> list[float]:
    """AdamW with linear warm-up and cosine decay for ``steps`` steps over shuffled ``examples``.

    Args:
        log: optional callable ``log(step, loss)``.

    Returns:
        The loss of every step.
    """
    import torch

    if steps <= 0 or not examples:
        return []
    rng = random.Random(seed)
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_scale(s: int) -> float:  # linear warm-up, cosine decay to 10%
        return min(1.0, (s + 1) / max(1, warmup_steps)) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    model.train()
    losses = []
    for step in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss, _ = sft_loss(model, batch, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses
