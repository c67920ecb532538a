"""Configuration machinery: load YAML + ``key=value`` overrides into typed dataclasses, report every problem at once,
and describe every field.

A leaf package: it imports no schema. Each section dataclass is declared once, by the module that owns it, and
registered in :data:`SECTIONS` (``data``, ``retriever``, ``env``, ``rollout`` and ``algorithm`` in the ``config``
module of their package, ``openrlhf`` and ``megatron`` in their integrations, the trainer's own ``model``,
``optimizer``, ``sft`` and ``logging`` in :mod:`openrlhf_search.trainer.config`); the training config tree is
assembled in :mod:`openrlhf_search.trainer.config`.
"""

from openrlhf_search.config.loader import (
    ConfigError,
    LoadResult,
    Rename,
    build_typed,
    config_to_dict,
    load_tree,
    origin,
    parse_overrides,
    raise_problems,
    read_yaml,
    save_config,
    tree_lines,
)
from openrlhf_search.config.reference import FieldDoc, describe, field_docs, markdown_table, render_text, type_name
from openrlhf_search.config.sections import SECTIONS, section

__all__ = ["ConfigError", "LoadResult", "Rename", "build_typed", "config_to_dict", "load_tree", "origin",
           "parse_overrides", "raise_problems", "read_yaml", "save_config", "tree_lines", "FieldDoc", "describe",
           "field_docs", "markdown_table", "render_text", "type_name", "SECTIONS", "section"]  # fmt: skip
