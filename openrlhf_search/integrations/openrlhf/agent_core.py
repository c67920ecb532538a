"""The OpenRLHF agent's logic, without OpenRLHF: a thin transport between OpenRLHF's multi-turn executor and the
project's one episode step (:class:`openrlhf_search.env.episode.Episode`).

:mod:`.agent` only subclasses OpenRLHF's classes with what is here (so this module, and the parity test that drives
it with a scripted engine, need neither OpenRLHF nor vLLM). Per trajectory (one ``AgentExecutor.execute``):

1. :func:`run_episode` sets our stop strings, ``include_stop_str_in_output`` and log-probs on the sampling params
   (OpenRLHF's first turn has none), builds the :class:`Episode` with ``max_total_tokens = --data.max_len`` and
   wraps the engine in :class:`TurnCappedEngine`;
2. on the first generation the engine wrapper starts a :class:`~openrlhf_search.env.trajectory.Trajectory` from the
   prompt ids OpenRLHF sends, caps every turn at ``Episode.turn_budget`` (OpenRLHF would give a turn the whole
   remaining budget), checks that OpenRLHF's context equals our trajectory's ids (token-in/token-out on both
   sides), and keeps the engine's output (ids, log-probs, finish reason) for the instance;
3. :class:`SearchAgentLogic.step` (OpenRLHF's ``AgentInstanceBase.step``) hands that output to ``Episode.step`` --
   the same plan / execute / render the local ``SearchEnv`` runs -- and returns the inserted observation text as
   ``environment_feedback`` (OpenRLHF tokenizes it with the same tokenizer, to the same ids) and ``done``;
4. :func:`finalize` scores the trajectory once, in one batch with the trajectories finishing beside it
   (:class:`~openrlhf_search.env.scoring.RewardBatcher`: an async reward is awaited, a plain one runs in a worker
   thread, both under the reward's timeout, so a slow reward never blocks vLLM's event loop), sets
   ``truncated`` (only for ``max_length``; OpenRLHF's own flag only reads the last turn's finish reason), fills
   ``extra_logs`` with ``Episode.metrics`` (fixed names: the episode's, the tools' and the reward's declared
   metrics, :func:`metric_names`) and, with ``calib_records``, publishes
   ``Trajectory.to_calib_record(offset=len(prompt) - 1)`` (OpenRLHF's action-mask axis) to :mod:`.calib_store`, its
   id in ``extra_logs["calib_id"]``; it also adds the trajectory's weight-version tags (``weight_version_min`` /
   ``weight_version_max``, read from the rollout actor before and after every turn by the engine wrapper;
   :mod:`.staleness`) and, with an HTTP retriever, ``retrieval/failover`` / ``retrieval/replica_errors``: the
   failovers and failed attempts of this trajectory's own searches (counted by the client into the trajectory's
   :data:`~openrlhf_search.retrieval.client.CALL_STATS`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
from copy import deepcopy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from openrlhf_search.env.episode import EPISODE_METRICS, Episode, reward_metric_names
from openrlhf_search.env.scoring import RewardBatcher
from openrlhf_search.env.tools import get_tools
from openrlhf_search.integrations.openrlhf import calib_store
from openrlhf_search.integrations.openrlhf.config import AGENT_CONFIG_ENV, AgentConfig, from_env
from openrlhf_search.integrations.openrlhf.staleness import engine_version, trajectory_tags
from openrlhf_search.plugins import load_plugins
from openrlhf_search.retrieval import load_retriever, replicas
from openrlhf_search.retrieval.client import CALL_STATS
from openrlhf_search.retrieval.metrics import replica_stats
from openrlhf_search.rewards import get_reward_fn
from openrlhf_search.viewer.records import trajectory_record, write_records

__all__ = ["AgentRuntime", "get_runtime", "parse_label", "EpisodeState", "TurnCappedEngine", "SearchAgentLogic",
           "run_episode", "finalize", "metric_names"]


@dataclass
class AgentRuntime:
    """Process-wide, built once per vLLM actor: config, retriever, reward function."""

    config: AgentConfig
    retriever: Any
    reward_fn: Any
    episodes: dict = field(default_factory=dict)
    """``Episode`` per ``(tokenizer id, max_length)`` (rules only, no per-trajectory state)."""
    batcher: RewardBatcher | None = None
    """Scores the trajectories finishing together in one reward call (built from ``reward_fn`` when first needed)."""

    def reward_batcher(self) -> RewardBatcher:
        """The :class:`~openrlhf_search.env.scoring.RewardBatcher` of ``reward_fn``."""
        if self.batcher is None or self.batcher.reward is not self.reward_fn:
            self.batcher = RewardBatcher(self.reward_fn)
        return self.batcher

    def episode(self, tokenizer, max_length: int):
        """The :class:`~openrlhf_search.env.episode.Episode` of this config for OpenRLHF's ``max_length``."""
        key = (id(tokenizer), int(max_length))
        if key not in self.episodes:
            env_cfg = dataclasses.replace(self.config.search_env_config(), max_total_tokens=int(max_length))
            ep = Episode(tokenizer, env_cfg.template, env_cfg)
            ep.check_retriever(self.retriever)
            self.episodes[key] = ep
        return self.episodes[key]


@lru_cache(maxsize=1)
def get_runtime() -> AgentRuntime:
    """Build the :class:`AgentRuntime` from ``OPENRLHF_SEARCH_AGENT_CONFIG`` (cached per process)."""
    cfg = from_env(AgentConfig, AGENT_CONFIG_ENV)
    load_plugins(cfg.plugins, source="agent config plugins")  # before the template, reward and tools resolve
    spec = replicas.discover(cfg.retrieval_replicas) if cfg.retrieval_replicas else cfg.retrieval_url
    http = not isinstance(spec, str) or spec.startswith(("http://", "https://"))
    return AgentRuntime(
        config=cfg,
        retriever=load_retriever(spec, **({"timeout": cfg.request_timeout} if http else {})),
        reward_fn=get_reward_fn(cfg.env.reward, **cfg.env.reward_kwargs),
    )


def metric_names(cfg: AgentConfig | None = None, reward=None) -> list[str]:
    """The ``extra_logs`` keys of every trajectory (``Episode.metric_names`` of the configured tools and reward;
    both from this process's runtime when not given)."""
    if cfg is None or reward is None:
        runtime = get_runtime()
        cfg, reward = cfg or runtime.config, reward if reward is not None else runtime.reward_fn
    env_cfg = cfg.search_env_config()
    return (list(EPISODE_METRICS) + [n for t in get_tools(env_cfg.tools, env_cfg) for n in t.metric_names()]
            + reward_metric_names(reward))


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


@dataclass
class EpisodeState:
    """Per-trajectory state shared by :func:`run_episode`, the engine wrapper and the instance."""

    episode: Any
    """The rules (:class:`~openrlhf_search.env.episode.Episode`)."""
    meta: dict = field(default_factory=dict)
    """Trajectory meta: ``question`` and ``golden_answers`` from the label (set by ``reset``)."""
    traj: Any = None
    """The :class:`~openrlhf_search.env.trajectory.Trajectory`, started by the first generation."""
    pending_outputs: list[Any] = field(default_factory=list)
    """Engine outputs the instance has not consumed yet (filled by :class:`TurnCappedEngine`)."""
    turn_versions: list[tuple[int, int]] = field(default_factory=list)
    """Per turn, the rollout actor's weight version before and after its generation (:mod:`.staleness`)."""
    retrieval_calls: dict = field(default_factory=dict)
    """Failovers and failed attempts of this trajectory's own retrieval requests (``client.CALL_STATS``)."""


_STATE: contextvars.ContextVar[EpisodeState] = contextvars.ContextVar("openrlhf_search_episode")


class TurnCappedEngine:
    """Wraps OpenRLHF's engine handle: starts the trajectory, caps each turn, records every turn's output."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        """Generate one turn with ``max_tokens = min(OpenRLHF's remaining budget, Episode.turn_budget)``."""
        st = _STATE.get()
        ids = [int(x) for x in prompt_token_ids]
        if st.traj is None:
            st.traj = st.episode.new_trajectory(ids, st.meta)
        elif ids != st.traj.prompt_ids + st.traj.response_ids:
            raise RuntimeError(
                "OpenRLHF's context differs from the episode's token ids (the feedback text was tokenized "
                f"differently: {len(ids)} vs {len(st.traj.prompt_ids) + len(st.traj.response_ids)} tokens); "
                "the agent and the trainer would disagree about what was sampled"
            )
        sampling_params.max_tokens = min(sampling_params.max_tokens, st.episode.turn_budget(st.traj))
        start = engine_version(self.engine)
        out = await self.engine.generate(prompt_token_ids, sampling_params, multi_modal_data=multi_modal_data)
        st.turn_versions.append((start, engine_version(self.engine)))
        st.pending_outputs.append(out.outputs[0])
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def _sampled_logprobs(out) -> list[float] | None:
    """The sampled tokens' log-probs of a vLLM ``CompletionOutput`` (None when not requested)."""
    lps = getattr(out, "logprobs", None)
    if not lps:
        return None
    return [float(d[t].logprob) if t in d else 0.0 for t, d in zip(out.token_ids, lps)]


def _zero_reward():
    import torch

    return torch.tensor(0.0)


class SearchAgentLogic:
    """The body of the OpenRLHF agent instance (``agent.SearchAgentInstance`` adds ``AgentInstanceBase``). OpenRLHF
    builds one per trajectory with no arguments; the state is the current :class:`EpisodeState`."""

    def __init__(self, *args, **kwargs) -> None:
        self.runtime = get_runtime()
        self.state = _STATE.get()

    async def reset(self, states: dict, **kwargs) -> dict:
        """Read the question and golden answers from the label; the prompt is used as rendered by the launcher."""
        question, golds = parse_label(states["label"])
        self.state.meta.update(question=question, golden_answers=golds)
        return {"observation": states["observation"]}

    async def step(self, states: dict, **kwargs) -> dict:
        """One model turn through ``Episode.step`` (the local environment's rules); the observation is returned
        as text for OpenRLHF to append."""
        st = self.state
        out = st.pending_outputs.pop(0)
        token = CALL_STATS.set(st.retrieval_calls)  # to_thread copies the context: the client counts into it
        try:
            feedback = await asyncio.to_thread(st.episode.step, st.traj, list(out.token_ids), _sampled_logprobs(out),
                                               getattr(out, "finish_reason", None), self.runtime.retriever)
        finally:
            CALL_STATS.reset(token)
        return {"rewards": _zero_reward(), "scores": 0.0, "environment_feedback": feedback, "done": st.traj.done,
                "extra_logs": {}}


def prepare_params(sampling_params, episode, record_logprobs: bool):
    """A copy of OpenRLHF's sampling params with our stop strings, the stop string kept in the output, log-probs."""
    params = deepcopy(sampling_params)
    params.stop = sorted(set(list(params.stop or []) + episode.stop_strings()))
    params.include_stop_str_in_output = True
    if record_logprobs and params.logprobs is None:
        params.logprobs = 1
    return params


async def run_episode(inner_execute, prompt, label, sampling_params, max_length: int, hf_tokenizer, llm_engine,
                      images=None) -> dict:
    """One trajectory through OpenRLHF's multi-turn loop ``inner_execute`` (``MultiTurnAgentExecutor.execute``),
    then :func:`finalize`."""
    runtime = get_runtime()
    episode = runtime.episode(hf_tokenizer, max_length)
    params = prepare_params(sampling_params, episode, runtime.config.record_logprobs)
    state = EpisodeState(episode=episode)
    token = _STATE.set(state)
    try:
        result = await inner_execute(prompt, label, params, max_length, hf_tokenizer, TurnCappedEngine(llm_engine),
                                     images=images)
    finally:
        _STATE.reset(token)
    return await finalize(result, state, runtime)


async def finalize(result: dict, state: EpisodeState, runtime: AgentRuntime | None = None) -> dict:
    """Outcome reward (computed once, whatever ended the episode, without blocking the event loop), truncation
    flag, logs and CalibAdv record."""
    runtime = runtime or get_runtime()
    ep, traj = state.episode, state.traj
    if traj is None:  # OpenRLHF never generated (the prompt filled the budget)
        traj = ep.new_trajectory(result.get("observation_tokens", []), state.meta)
        traj.finish_reason = "max_length"
    if traj.finish_reason is None:  # OpenRLHF stopped the loop on its own budget
        traj.finish_reason = "max_length"
    score, info = await runtime.reward_batcher().score(traj)
    result["reward"] = score
    result["scores"] = score
    result["truncated"] = traj.finish_reason == "max_length"
    logs = ep.metrics(traj, info, runtime.reward_fn)
    logs.update(trajectory_tags(state.turn_versions))  # weight versions: staleness in the trainer (.staleness)
    if replica_stats(runtime.retriever) is not None:  # an HTTP retriever: its failovers in this trajectory
        logs["retrieval/failover"] = float(state.retrieval_calls.get("failovers", 0))
        logs["retrieval/replica_errors"] = float(state.retrieval_calls.get("replica_errors", 0))
    if runtime.config.calib_records:
        record = dataclasses.asdict(traj.to_calib_record(offset=len(traj.prompt_ids) - 1))
        record_id = calib_store.new_record_id()
        await calib_store.publish_async(record_id, record)
        logs[calib_store.CALIB_ID_KEY] = record_id
    result["extra_logs"] = logs
    if runtime.config.rollout_dir:
        write_viewer_record(runtime, traj, score, info, ep, state.turn_versions)
    return result


_EPISODES_SEEN = [0]


def write_viewer_record(runtime: AgentRuntime, traj, score: float, info: dict, episode,
                        turn_versions: list | None = None) -> None:
    """Every ``rollout_every``-th finished episode of this process as a viewer record (``agent_<pid>.jsonl``).

    The same :func:`~openrlhf_search.viewer.records.trajectory_record` as the local trainer; advantages and ratios are
    computed later in OpenRLHF's training actors and are not part of these records. Never fails an episode: a
    write error is reported once on stderr."""
    import os
    import sys
    from pathlib import Path

    _EPISODES_SEEN[0] += 1
    if (_EPISODES_SEEN[0] - 1) % runtime.config.rollout_every:
        return
    try:
        rec = trajectory_record(traj, episode.tokenizer, reward=score, reward_info=info)
        rec["episode"] = _EPISODES_SEEN[0]
        if turn_versions is not None:
            rec["turn_weight_versions"] = [list(v) for v in turn_versions]  # per turn: version at start, at end
        write_records(Path(runtime.config.rollout_dir) / f"agent_{os.getpid()}.jsonl", [rec])
    except Exception as exc:  # diagnostics must never stop training
        if not getattr(write_viewer_record, "warned", False):
            write_viewer_record.warned = True
            print(f"[openrlhf-search] viewer records disabled in pid {os.getpid()}: {exc}", file=sys.stderr)
