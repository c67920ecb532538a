"""Rollout engines (token-in / token-out) and the multi-turn batched runner.

Heavy backends are imported lazily: ``HFEngine`` needs torch + transformers, ``VLLMEngine`` needs vllm.
"""

from openrlhf_search.registry import Registry
from openrlhf_search.rollout.base import Engine, Generation, SamplingParams, match_stop_string

__all__ = ["ENGINES", "Engine", "Generation", "SamplingParams", "match_stop_string", "HFEngine", "VLLMEngine",
           "run_rollouts"]

ENGINES: Registry[str] = Registry("rollout engine")
"""``rollout.engine`` names -> ``module:class`` of the engine (imported lazily)."""
ENGINES.add("hf", "openrlhf_search.rollout.hf:HFEngine")
ENGINES.add("vllm", "openrlhf_search.rollout.vllm:VLLMEngine")


def __getattr__(name):  # lazy: keep ``import openrlhf_search.rollout`` free of torch
    if name == "HFEngine":
        from openrlhf_search.rollout.hf import HFEngine

        return HFEngine
    if name == "VLLMEngine":
        from openrlhf_search.rollout.vllm import VLLMEngine

        return VLLMEngine
    if name in ("run_rollouts", "collect_groups"):
        from openrlhf_search.rollout import runner

        return getattr(runner, name)
    raise AttributeError(name)
