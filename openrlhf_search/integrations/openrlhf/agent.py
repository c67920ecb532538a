"""Our search agent as OpenRLHF 0.11.2's agent executor (``--train.agent_func_path`` loads it via ``agent_func.py``).

OpenRLHF loads this file in *every* vLLM rollout actor and builds :class:`AgentExecutor` with no arguments; the
configuration therefore comes from the :class:`~.config.AgentConfig` JSON named by ``OPENRLHF_SEARCH_AGENT_CONFIG``.
Retrieval is a service (``HTTPRetriever`` on ``openrlhf-search serve``): the executor runs in many processes at once.

This module is only the OpenRLHF subclassing: :class:`AgentExecutor` keeps ``MultiTurnAgentExecutor``'s
token-in/token-out loop and :class:`SearchAgentInstance` is an ``AgentInstanceBase``; everything they do is in the
OpenRLHF-free :mod:`.agent_core`, which runs the project's one episode step
(:class:`openrlhf_search.env.episode.Episode`, the same rules, records, reward call and metrics as the local
``SearchEnv``; the parity tests compare the two token for token).
"""

from __future__ import annotations

from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

from openrlhf_search.integrations.openrlhf.agent_core import SearchAgentLogic, get_runtime, metric_names, run_episode

__all__ = ["AgentExecutor", "SearchAgentInstance", "get_runtime", "metric_names"]


class SearchAgentInstance(SearchAgentLogic, AgentInstanceBase):
    """One search episode (OpenRLHF builds it with no arguments per trajectory; see :class:`.SearchAgentLogic`)."""


class AgentExecutor(MultiTurnAgentExecutor):
    """The class OpenRLHF instantiates (no arguments) from ``--train.agent_func_path``."""

    def __init__(self) -> None:
        super().__init__(SearchAgentInstance)

    async def execute(self, prompt, label, sampling_params, max_length: int, hf_tokenizer, llm_engine, images=None):
        """Run one episode through OpenRLHF's multi-turn loop (:func:`.agent_core.run_episode`)."""
        return await run_episode(super().execute, prompt, label, sampling_params, max_length, hf_tokenizer,
                                 llm_engine, images=images)
