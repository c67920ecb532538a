"""Re-export of :class:`openrlhf_search.registry.Registry` (the one plugin mechanism; it lives at the package top
level because rewards, templates, tools and retrievers use it too)."""

from openrlhf_search.registry import Registry, did_you_mean

__all__ = ["Registry", "did_you_mean"]
