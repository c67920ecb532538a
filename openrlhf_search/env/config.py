"""The environment's configuration, declared once: the ``env:`` section of the training config, the limits every
:class:`~openrlhf_search.env.episode.Episode` runs under, and the ``env`` of the OpenRLHF agent's config.

Every front end embeds this one dataclass (the local trainer and eval build their environment from ``cfg.env``, the
OpenRLHF launcher writes ``cfg.env`` into the agent's JSON), so a new field reaches every backend without another
edit. Defaults follow Search-R1 (4 turns of <= 500 tokens, observations cut to 500 tokens, top-3); the quickstart's
smaller budgets live in its own config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openrlhf_search.config import section

__all__ = ["EnvConfig"]


@section("env")
@dataclass
class EnvConfig:
    """The multi-turn search environment: template, reward, tools and the limits of an episode."""

    template: str = "search_r1"
    """Prompt template name (``openrlhf_search.env`` registry) or a template file."""
    max_turns: int = 4
    """Maximum model generations per trajectory, the answering one included."""
    max_tokens_per_turn: int = 500
    """Generation budget of one turn."""
    max_obs_tokens: int = 500
    """Observations (retrieved passages) are truncated to this many tokens (the wrapper tags are extra)."""
    max_total_tokens: int = 4096
    """Budget of prompt + response tokens; a trajectory that cannot fit another turn ends with ``max_length``."""
    max_response_tokens: int | None = None
    """Optional budget of the whole response (model + observation tokens); the trajectory ends when it is exhausted.
    None: only ``max_total_tokens`` limits it (OpenRLHF backend: ``max_total_tokens - openrlhf.max_prompt_tokens``)."""
    topk: int = 3
    """Passages returned per query (older configs: ``retriever.topk``)."""
    max_queries_per_turn: int = 3
    """Queries kept from one search action (extra ones are dropped)."""
    max_docs_per_turn: int | None = None
    """Documents shown per observation after merging queries (None = ``topk * max_queries_per_turn``)."""
    forbid_search_on_last_turn: bool = True
    """Tell the model before its last turn that no search is left, and do not execute a last-turn tool call."""
    end_on_eos: bool = True
    """A generation ending with EOS and no valid action ends the trajectory (``stop``) instead of a correction."""
    min_turn_tokens: int = 16
    """If fewer tokens than this remain for the next generation, the trajectory ends with ``max_length``."""
    reward: str = "format_em"
    """Reward function name (``openrlhf_search.rewards.get_reward_fn``); the default is Search-R1's exact match with
    a format check."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Options of the reward (``format_*``: the ``FormatRewardWeights`` fields such as ``retrieval_score`` and
    ``no_search_penalty``; every reward: ``timeout``, seconds per batch)."""
    tools: list[str] = field(default_factory=lambda: ["search"])
    """Tools the model may call (``openrlhf_search.env.tools`` registry: ``search``, ``open``); the action parser,
    the prompt, the stop strings, the format check and the metrics follow from this list."""
    open_page_tokens: int | None = None
    """``open`` tool: tokens per page of an opened document (None = ``max_obs_tokens``)."""
    tool_options: dict[str, dict] = field(default_factory=dict)
    """Each tool's own settings by tool name (``{web_search: {max_results: 5}}``): the keys are the fields of the
    tool's :attr:`~openrlhf_search.env.tools.Tool.options` dataclass; only tools of :attr:`tools` may appear."""

    def __post_init__(self) -> None:
        if isinstance(self.tools, str):
            self.tools = [self.tools]
        self.tools = list(self.tools)
        if not isinstance(self.tool_options, dict) or not all(
                isinstance(v, dict) for v in self.tool_options.values()):
            raise ValueError(f"EnvConfig.tool_options must map tool names to option mappings, got "
                             f"{self.tool_options!r}")
        self.tool_options = {str(k): dict(v) for k, v in self.tool_options.items()}

    def problems(self) -> list[tuple[str, str]]:
        """``[(field, message)]`` for every limit out of range (the config check reports them with their source;
        :class:`~openrlhf_search.env.episode.Episode` refuses to run with one)."""
        out = [(k, "must be >= 1") for k in ("max_turns", "max_tokens_per_turn", "max_total_tokens", "topk",
                                              "max_queries_per_turn", "min_turn_tokens") if getattr(self, k) < 1]
        if self.max_obs_tokens < 0:
            out.append(("max_obs_tokens", "must be >= 0"))
        out += [(k, "must be >= 1 or null") for k in ("max_response_tokens", "max_docs_per_turn", "open_page_tokens")
                if getattr(self, k) is not None and getattr(self, k) < 1]  # fmt: skip
        if self.max_tokens_per_turn > self.max_total_tokens >= 1:
            out.append(("max_tokens_per_turn", f"must be <= env.max_total_tokens={self.max_total_tokens}"))
        return out

    def check(self) -> EnvConfig:
        """Raise ``ValueError`` naming the first count an episode cannot run with; return ``self``."""
        for name in ("max_turns", "max_tokens_per_turn", "max_total_tokens", "topk", "max_queries_per_turn"):
            if getattr(self, name) < 1:
                raise ValueError(f"EnvConfig.{name} must be >= 1, got {getattr(self, name)}")
        return self
