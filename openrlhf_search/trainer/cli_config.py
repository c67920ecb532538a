"""``openrlhf-search config [SECTION]``: every field of the training config with its type, default and docstring.

    openrlhf-search config                 # the whole tree
    openrlhf-search config env             # one section (also: openrlhf, megatron.parallel, a plugin's section)
    openrlhf-search config --markdown      # the reference table of docs/trainer.md

The same rows generate the reference table of ``docs/trainer.md`` (``python scripts/config_reference.py``; a test
keeps the two equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from openrlhf_search.config import SECTIONS, describe, markdown_table, render_text
from openrlhf_search.plugins import PluginError, load_plugins
from openrlhf_search.registry import did_you_mean
from openrlhf_search.trainer.config import TrainConfig

SKIP = ("plugin_sections",)
"""Fields of the tree left out of the reference (filled by the loader from the plugins' own sections)."""


def section_class(name: str) -> type | None:
    """The dataclass of a dotted section path of the tree (``env``, ``megatron.parallel``) or of a registered
    section (a plugin's); None if there is none."""
    cls: typing.Any = TrainConfig
    for part in name.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return SECTIONS.get(name) if name in SECTIONS else None
        cls = hints[part]
    return cls


def reference_rows(section: str = ""):
    """The rows of ``section`` (the whole tree when empty), keys prefixed with the section path."""
    if not section:
        return describe(TrainConfig, skip=SKIP)
    cls = section_class(section)
    if cls is None:
        raise KeyError(section)
    return describe(cls, prefix=f"{section}.")


def reference_table() -> list[str]:
    """The markdown reference table of the whole tree (the block of ``docs/trainer.md``)."""
    return markdown_table(reference_rows())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("section", nargs="?", default="",
                        help="a section (model, data, retriever, env, rollout, algorithm, optimizer, sft, logging, "
                             "openrlhf, megatron, megatron.parallel, or a plugin's); default: every field")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of text")
    parser.add_argument("--plugins", nargs="*", default=[], metavar="MODULE",
                        help="import these plugin modules first (their sections become visible)")


def run(args: argparse.Namespace) -> int:
    try:
        load_plugins(args.plugins, source="--plugins")
    except PluginError as exc:
        print(f"openrlhf-search config: {exc}", file=sys.stderr)
        return 2
    try:
        rows = reference_rows(args.section)
    except KeyError:
        hints = typing.get_type_hints(TrainConfig)
        names = sorted({n for n, tp in hints.items() if dataclasses.is_dataclass(tp)} | set(SECTIONS.names()))
        print(f"openrlhf-search config: unknown section {args.section!r}{did_you_mean(args.section, names)}; "
              f"sections: {', '.join(names)}", file=sys.stderr)
        return 2
    try:
        print("\n".join(markdown_table(rows)) if args.markdown else render_text(rows))
    except BrokenPipeError:  # the reader (e.g. ``head``) stopped early
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no flush error at exit)
    return 0
