"""Trainer-side prompt templates (registered into ``openrlhf_search.env.templates`` on import).

``search_r1_compact``: the ``search_r1`` tag protocol with a one-line instruction. The quickstart's tiny model is
trained from scratch and cannot read instructions, while every prompt token costs compute in every forward pass:
the full ``search_r1`` instruction is ~115 tokens with the tiny tokenizer, about 40% of a demonstration. Same
stop strings, observation wrapping and answer format, so rewards and the environment are unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from openrlhf_search.env.templates import available_templates, get_template, register_template

COMPACT_USER = "Search with <search> query </search>, answer with <answer> answer </answer>.\nQuestion: {question}\n"

if "search_r1_compact" not in available_templates():

    @register_template("search_r1_compact")
    def _search_r1_compact():
        return replace(get_template("search_r1"), name="search_r1_compact", user=COMPACT_USER)
