"""Datasets: the ``QASample`` row, FlashRAG / Search-R1 readers and writers, the synthetic knowledge base,
the tiny local tokenizer builder and the optional FanOutQA real-data loader (imported on demand)."""

from openrlhf_search.data.types import QASample

__all__ = ["QASample"]
