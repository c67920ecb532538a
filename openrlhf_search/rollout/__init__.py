"""Rollout engines (token-in / token-out) and the multi-turn batched runner.

``HFEngine`` needs torch + transformers and ``VLLMEngine`` vllm when they run (their modules import those lazily);
the runner imports torch, so it is imported on first use: ``import openrlhf_search.rollout`` stays free of torch.
"""

from openrlhf_search.registry import Registry
from openrlhf_search.rollout.base import Engine, Generation, SamplingParams, match_stop_string
from openrlhf_search.rollout.hf import HFEngine
from openrlhf_search.rollout.vllm import VLLMEngine

__all__ = ["ENGINES", "Engine", "Generation", "SamplingParams", "match_stop_string", "HFEngine", "VLLMEngine",
           "run_rollouts", "collect_groups"]

ENGINES: Registry[str] = Registry("rollout engine")
"""``rollout.engine`` names -> ``module:class`` of the engine (imported lazily)."""
ENGINES.add("hf", "openrlhf_search.rollout.hf:HFEngine")
ENGINES.add("vllm", "openrlhf_search.rollout.vllm:VLLMEngine")



def __getattr__(name):  # the runner imports torch: keep ``import openrlhf_search.rollout`` free of it
    if name in ("run_rollouts", "collect_groups"):
        from openrlhf_search.rollout import runner

        return getattr(runner, name)
    raise AttributeError(name)
