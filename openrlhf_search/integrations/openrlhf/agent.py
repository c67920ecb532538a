"""Our search agent as OpenRLHF 0.11.2's agent executor (``--train.agent_func_path`` loads it via ``agent_func.py``).

OpenRLHF loads this file in *every* vLLM rollout actor and builds :class:`AgentExecutor` with no arguments; the
configuration therefore comes from the :class:`~.config.AgentConfig` JSON named by ``OPENRLHF_SEARCH_AGENT_CONFIG``.
Retrieval is a service (``HTTPRetriever`` on ``openrlhf-search serve``): the executor runs in many processes at once.

How the pieces map onto OpenRLHF (``openrlhf/utils/agent.py``):

* :class:`AgentExecutor` subclasses OpenRLHF's ``MultiTurnAgentExecutor`` and keeps its token-in/token-out loop:
  prompt and model tokens are never re-tokenized; only environment feedback is tokenized (once) and masked
  through ``action_ranges``. Around that loop it (1) sets our stop strings (``</search>``, ``</answer>`` for the
  default template) and ``include_stop_str_in_output`` on the sampling params *before* the first turn (OpenRLHF's
  first turn has none), (2) wraps the engine so each turn gets ``min(remaining budget, max_tokens_per_turn)``
  tokens (OpenRLHF gives every turn the whole remaining budget), (3) requests log-probs of sampled tokens, and
  (4) after the loop computes the outcome reward once, the truncation flag and the diagnostics.
* :class:`SearchAgentInstance` (an ``AgentInstanceBase``) parses each turn with the project's
  :func:`~openrlhf_search.env.actions.parse_action`, retrieves through the HTTP client and renders the observation
  with :func:`~openrlhf_search.env.observation.format_observation` and the template's wrapper; invalid actions get
  the template's fixed corrective feedback, as in the local environment.

Termination and ``truncated``: an episode ends on an answer (``answer``), when the model ends its message without an
action (``stop``), after ``max_turns`` model turns (``max_turns``), or when the token budget ``--data.max_len`` is
exhausted (``max_length``). ``truncated`` is True only for ``max_length``; OpenRLHF's own flag only looks at the
last turn's ``finish_reason`` and misses a budget exhausted by feedback tokens.

Per-turn records: every turn's kind, queries and document ids are kept; with ``calib_records`` the trajectory's
CalibAdv record (spans on OpenRLHF's action-mask axis, i.e. token position - 1) is published to :mod:`.calib_store`
and its id travels in ``extra_logs["calib_id"]``. ``extra_logs`` always carries the same scalar keys
(:data:`EXTRA_LOG_KEYS`) so OpenRLHF can stack them across samples.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from copy import deepcopy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

from openrlhf_search.integrations.openrlhf import calib_store
from openrlhf_search.integrations.openrlhf.config import AGENT_CONFIG_ENV, AgentConfig, from_env

EXTRA_LOG_KEYS = (
    "search/num_turns",
    "search/num_searches",
    "search/num_invalid",
    "search/num_docs",
    "search/answered",
    "search/truncated",
    "search/em",
    "search/f1",
    "search/valid_format",
    "search/retrieval_hit",
)
"""Scalar diagnostics every trajectory reports through OpenRLHF's ``extra_logs`` (averaged in its logs)."""


@dataclass
class TurnInfo:
    """One model turn of an episode."""

    kind: str
    """``search``, ``answer`` or ``invalid``."""
    text: str = ""
    """The decoded model text of the turn."""
    queries: list[str] = field(default_factory=list)
    """Search queries (``search`` only)."""
    doc_ids: list[str] = field(default_factory=list)
    """Ids of the documents shown after this turn (merged over its queries, rank order, no duplicates)."""
    repeated: bool = False
    """Same rule as the local environment (``SearchEnv``): every query already issued, every document already
    shown, or the same turn text as an earlier turn (CalibAdv gives repeated turns no credit)."""
    executed: bool = False
    """The turn's queries were run (a search on the last turn is not)."""
    finish_reason: str | None = None
    """vLLM's finish reason of the turn (``stop`` or ``length``)."""
    stop_reason: Any = None
    """The stop string that ended the turn (``None`` for EOS or length)."""


@dataclass
class Episode:
    """Per-trajectory state shared by the executor, the engine wrapper and the instance (one per ``execute``)."""

    tokenizer: Any
    """OpenRLHF's HF tokenizer (counts observation tokens)."""
    golden_answers: list[str] = field(default_factory=list)
    """Reference answers from the label."""
    question: str = ""
    """The question (diagnostics only)."""
    turns: list[TurnInfo] = field(default_factory=list)
    """Model turns so far."""
    response_text: str = ""
    """Everything after the prompt: model turns and observations, as decoded."""
    retrieved_text: str = ""
    """Concatenated observation bodies (for the reward's retrieval-hit signal)."""
    answer: str | None = None
    """The answer the parser accepted (``None`` if the episode ended without one): this, not the last ``<answer>``
    block of the text, is what the reward scores (same rule as ``SearchEnv.compute_rewards``)."""
    finish: str | None = None
    """``answer`` | ``stop`` | ``max_turns`` once the instance ended the episode; ``None`` if the budget ran out."""
    pending_outputs: list[Any] = field(default_factory=list)
    """vLLM outputs of turns the instance has not consumed yet (filled by the engine wrapper)."""


_EPISODE: contextvars.ContextVar[Episode] = contextvars.ContextVar("openrlhf_search_episode")


@dataclass
class AgentRuntime:
    """Process-wide, built once per vLLM actor: config, template, retriever, reward function."""

    config: AgentConfig
    template: Any
    retriever: Any
    reward_fn: Any


@lru_cache(maxsize=1)
def get_runtime() -> AgentRuntime:
    """Build the :class:`AgentRuntime` from ``OPENRLHF_SEARCH_AGENT_CONFIG`` (cached per process)."""
    from openrlhf_search.env.templates import get_template
    from openrlhf_search.plugins import load_plugins
    from openrlhf_search.retrieval import load_retriever
    from openrlhf_search.rewards import get_reward_fn

    cfg = from_env(AgentConfig, AGENT_CONFIG_ENV)
    load_plugins(cfg.plugins, source="agent config plugins")  # before the template, reward and tools resolve
    http = cfg.retrieval_url.startswith(("http://", "https://"))
    return AgentRuntime(
        config=cfg,
        template=get_template(cfg.template),
        retriever=load_retriever(cfg.retrieval_url, **({"timeout": cfg.request_timeout} if http else {})),
        reward_fn=get_reward_fn(cfg.reward, **cfg.reward_kwargs),
    )


def parse_label(label: Any) -> tuple[str, list[str]]:
    """``(question, golden_answers)`` from an OpenRLHF label.

    The launcher writes labels as JSON ``{"question": ..., "golden_answers": [...]}``; a JSON list, a plain string
    or a list object are accepted too (golden answers only).
    """
    value = label
    if isinstance(label, str):
        try:
            value = json.loads(label)
        except json.JSONDecodeError:
            return "", [label]
    if isinstance(value, dict):
        golds = value.get("golden_answers", value.get("answers"))
        if golds is None:
            raise ValueError(f"label has no 'golden_answers' key: {str(label)[:200]}")
        return str(value.get("question", "")), [str(g) for g in ([golds] if isinstance(golds, str) else golds)]
    if isinstance(value, (list, tuple)):
        return "", [str(g) for g in value]
    return "", [str(value)]


def calib_record(episode: Episode, action_ranges: list[tuple[int, int]], info: dict) -> dict:
    """The CalibAdv record of a finished episode as a plain dict (the fields of ``CalibRecord``).

    Spans index OpenRLHF's action-mask axis: ``action_mask = mask[1:]``, so a model turn occupying token positions
    ``[s, e)`` of the full sequence is ``[s - 1, e - 1)`` there. Turns the budget cut before the instance saw them
    have no record. ``answer_span`` is the whole answer turn.
    """
    search_turns, answer_span = [], None
    for turn, (start, end) in zip(episode.turns, action_ranges):
        if turn.kind == "search" and turn.executed:
            search_turns.append(
                {"start": start - 1, "end": end - 1, "doc_ids": list(turn.doc_ids), "repeated": turn.repeated}
            )
        elif turn.kind == "answer":
            answer_span = (start - 1, end - 1)
    return {
        "search_turns": search_turns,
        "answer_span": answer_span,
        "f1": float(info.get("f1", 0.0)),
        "valid_format": bool(info.get("valid_format", False)),
    }


class _TurnCappedEngine:
    """Wraps OpenRLHF's engine handle: caps each turn's ``max_tokens`` and records every turn's output."""

    def __init__(self, engine: Any, max_tokens_per_turn: int) -> None:
        self.engine = engine
        self.max_tokens_per_turn = max_tokens_per_turn

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        """Generate one turn with ``max_tokens = min(remaining budget, per-turn cap)``."""
        sampling_params.max_tokens = min(sampling_params.max_tokens, self.max_tokens_per_turn)
        out = await self.engine.generate(prompt_token_ids, sampling_params, multi_modal_data=multi_modal_data)
        _EPISODE.get().pending_outputs.append(out.outputs[0])
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class SearchAgentInstance(AgentInstanceBase):
    """One search episode: parse the model's turn, retrieve, return the observation (OpenRLHF builds it with no
    arguments per trajectory; the shared state comes from :func:`get_runtime` and the current :class:`Episode`)."""

    def __init__(self, *args, **kwargs) -> None:
        self.runtime = get_runtime()
        self.episode = _EPISODE.get()

    async def reset(self, states: dict, **kwargs) -> dict:
        """Read the question and golden answers from the label; the prompt is used as rendered by the launcher."""
        self.episode.question, self.episode.golden_answers = parse_label(states["label"])
        return {"observation": states["observation"]}

    async def step(self, states: dict, **kwargs) -> dict:
        """Consume one model turn; see the module docstring for the termination rules."""
        from openrlhf_search.env.actions import parse_action
        from openrlhf_search.env.observation import format_observation
        from openrlhf_search.env.search_env import merge_hits, turn_is_repeated

        cfg, tpl, ep = self.runtime.config, self.runtime.template, self.episode
        out = ep.pending_outputs.pop(0) if ep.pending_outputs else None
        action_text = states["action_text"]
        action = parse_action(action_text, protocol=tpl.protocol, max_queries=cfg.max_queries_per_turn)
        turn = TurnInfo(
            kind=action.kind,
            queries=list(action.queries),
            text=action_text,
            finish_reason=getattr(out, "finish_reason", None),
            stop_reason=getattr(out, "stop_reason", None),
        )
        ep.turns.append(turn)
        ep.response_text += action_text
        last_turn = len(ep.turns) >= cfg.max_turns
        hint = len(ep.turns) == cfg.max_turns - 1  # the next turn is the last: no search there
        ended_by_eos = turn.finish_reason == "stop" and turn.stop_reason is None
        feedback, done = "", False
        if action.kind == "answer":
            ep.finish, done = "answer", True
            ep.answer = action.answer
        elif action.kind == "search" and not last_turn:
            hits_per_query = await asyncio.to_thread(self.runtime.retriever.search, list(action.queries), cfg.topk)
            hits = merge_hits(hits_per_query, cfg.topk * cfg.max_queries_per_turn)
            turn.executed = True
            turn.doc_ids = [h.document.id for h in hits]
            turn.repeated = turn_is_repeated(turn.queries, turn.doc_ids, action_text, ep.turns[:-1])
            body = format_observation(hits, tokenizer=ep.tokenizer, max_tokens=cfg.max_obs_tokens)
            ep.retrieved_text += body + "\n"
            feedback = tpl.wrap_observation(body, turn_ended=ended_by_eos, hint=hint)
        elif ended_by_eos and action.kind == "invalid":
            ep.finish, done = "stop", True
        elif not last_turn:
            feedback = tpl.feedback(turn_ended=ended_by_eos, hint=hint)
        if not done and last_turn:
            ep.finish, done = "max_turns", True
        ep.response_text += feedback
        return {
            "rewards": _zero_reward(),
            "scores": 0.0,
            "environment_feedback": feedback,
            "done": done,
            "extra_logs": {},
        }


def _zero_reward():
    import torch

    return torch.tensor(0.0)


class AgentExecutor(MultiTurnAgentExecutor):
    """The class OpenRLHF instantiates (no arguments) from ``--train.agent_func_path``."""

    def __init__(self) -> None:
        super().__init__(SearchAgentInstance)

    async def execute(self, prompt, label, sampling_params, max_length: int, hf_tokenizer, llm_engine, images=None):
        """Run one episode through OpenRLHF's multi-turn loop, then score it and fill the logs."""
        cfg = get_runtime().config
        stops = list(get_runtime().template.stop)
        params = deepcopy(sampling_params)
        params.stop = sorted(set(list(params.stop or []) + stops))
        params.include_stop_str_in_output = True
        if cfg.record_logprobs and params.logprobs is None:
            params.logprobs = 1
        episode = Episode(tokenizer=hf_tokenizer)
        token = _EPISODE.set(episode)
        try:
            engine = _TurnCappedEngine(llm_engine, cfg.max_tokens_per_turn)
            result = await super().execute(prompt, label, params, max_length, hf_tokenizer, engine, images=images)
        finally:
            _EPISODE.reset(token)
        return await finalize(result, episode, cfg)


async def finalize(result: dict, episode: Episode, cfg: AgentConfig) -> dict:
    """Outcome reward (computed once, whatever ended the episode), truncation flag, logs and CalibAdv record."""
    score, info = get_runtime().reward_fn(
        episode.response_text, episode.golden_answers, episode.retrieved_text, answer=episode.answer
    )
    finish = episode.finish or "max_length"
    result["reward"] = float(score)
    result["scores"] = float(score)
    result["truncated"] = finish == "max_length"
    turns = episode.turns
    logs = {
        "search/num_turns": float(len(turns)),
        "search/num_searches": float(sum(t.kind == "search" for t in turns)),
        "search/num_invalid": float(sum(t.kind == "invalid" for t in turns)),
        "search/num_docs": float(sum(len(t.doc_ids) for t in turns)),
        "search/answered": float(finish == "answer"),
        "search/truncated": float(finish == "max_length"),
        "search/em": float(info.get("em", 0.0)),
        "search/f1": float(info.get("f1", 0.0)),
        "search/valid_format": float(bool(info.get("valid_format", False))),
        "search/retrieval_hit": float(bool(info.get("retrieval_hit", False))),
    }
    if cfg.calib_records:
        record_id = calib_store.new_record_id()
        await calib_store.publish_async(record_id, calib_record(episode, result["action_ranges"], info))
        logs[calib_store.CALIB_ID_KEY] = record_id
    result["extra_logs"] = logs
    return result
