"""The search environment: prompt templates, action parsing, observations, token-in/token-out trajectories.

``SearchEnv`` drives a batch of trajectories turn by turn (one retrieval call per turn for the whole batch);
``parse_action`` and ``format_observation`` are the single-sample pieces the OpenRLHF agent reuses.
"""

from openrlhf_search.env.actions import Action, parse_action
from openrlhf_search.env.observation import format_observation, neutralize
from openrlhf_search.env.search_env import EnvConfig, SearchEnv
from openrlhf_search.env.templates import PromptTemplate, available_templates, get_template
from openrlhf_search.env.trajectory import Trajectory, TurnRecord

__all__ = [
    "Action",
    "EnvConfig",
    "PromptTemplate",
    "SearchEnv",
    "Trajectory",
    "TurnRecord",
    "available_templates",
    "format_observation",
    "get_template",
    "neutralize",
    "parse_action",
]
