"""Compatibility shim: ``search_r1_compact`` is built into :mod:`openrlhf_search.env.templates` (so every process,
vLLM rollout actors included, resolves it by name). Importing this module registers nothing."""

from openrlhf_search.env.templates import COMPACT_USER

__all__ = ["COMPACT_USER"]
