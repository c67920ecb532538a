"""The search environment: one episode step shared by every backend, tools, prompt templates, action parsing,
observations, token-in/token-out trajectories.

:class:`Episode` is the per-trajectory step (plan -> batched tool execute -> render) that both ``SearchEnv`` (the
local batched environment: one backend call per tool per turn for the whole batch) and the OpenRLHF agent instance
run; :data:`~openrlhf_search.env.tools.TOOLS` holds the tools (``search``, ``open``); :mod:`.protocol` the tag
grammar and answer normalisation; :mod:`.scoring` the reward call of every backend.
"""

from openrlhf_search.env.actions import Action, parse_action
from openrlhf_search.env.episode import EnvConfig, Episode
from openrlhf_search.env.observation import format_observation, neutralize
from openrlhf_search.env.scoring import Reward, RewardInput, score_trajectories, score_trajectory
from openrlhf_search.env.search_env import SearchEnv
from openrlhf_search.env.templates import PromptTemplate, available_templates, get_template
from openrlhf_search.env.tools import TOOLS, Tool, get_tools
from openrlhf_search.env.trajectory import Trajectory, TurnRecord

__all__ = [
    "Action",
    "EnvConfig",
    "Episode",
    "PromptTemplate",
    "Reward",
    "RewardInput",
    "SearchEnv",
    "TOOLS",
    "Tool",
    "Trajectory",
    "TurnRecord",
    "available_templates",
    "format_observation",
    "get_template",
    "get_tools",
    "neutralize",
    "parse_action",
    "score_trajectories",
    "score_trajectory",
]
