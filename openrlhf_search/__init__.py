"""openrlhf-search: reinforcement learning for LLM search agents.

Importing the package is cheap and CPU-safe: no heavy optional dependency (ray, vllm, deepspeed, faiss,
openrlhf, megatron) is imported here or by any module at import time; they are imported inside the functions
that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
