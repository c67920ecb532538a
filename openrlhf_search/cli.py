"""The ``openrlhf-search`` command line: one small dispatcher, many front ends.

Each sub-command lives next to the code it drives and is registered here by module path, so that
``openrlhf-search --help`` imports nothing heavy. A command module exposes ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

# name -> (module path, one-line help). Modules are imported only when their command runs (or for --help of it).
COMMANDS: dict[str, tuple[str, str]] = {
    "index": ("openrlhf_search.retrieval.cli_index", "build a BM25 or dense index from a corpus"),
    "serve": ("openrlhf_search.retrieval.cli_serve", "serve an index over HTTP (Search-R1 /retrieve protocol)"),
    "train": ("openrlhf_search.trainer.cli_train", "train a search agent with RL (local, openrlhf or megatron)"),
    "config": ("openrlhf_search.trainer.cli_config", "show every config field with its type, default and meaning"),
    "eval": ("openrlhf_search.trainer.cli_eval", "evaluate a model on FlashRAG-format QA datasets"),
    "quickstart": ("openrlhf_search.trainer.cli_quickstart", "train a tiny search agent on CPU end to end"),
    "view": ("openrlhf_search.viewer.report", "write a self-contained HTML report of a run's trajectories"),
    "data": ("openrlhf_search.data.cli", "generate / convert datasets (synthetic KB, FlashRAG <-> Search-R1)"),
    "demo-algorithms": ("openrlhf_search.algorithms.demo", "a small numeric demonstration of the losses"),
}


TORCH_COMMANDS = ("train", "eval", "quickstart")
"""Commands whose modules import torch; :func:`_torch_environment` runs before they load."""


def _torch_environment() -> None:
    """Process settings of the commands that run torch (a user's own setting wins).

    * ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads sleep in barriers instead of spinning (on a shared 2-core machine
      spinning made updates ~10x and generation ~4x slower); libgomp reads it when torch loads.
    * ``MKL_CBWR=AUTO,STRICT``: MKL's matrix products give the same bits wherever their operands lie in memory.
      Without it a CPU product can differ in the last bit with the operands' alignment, i.e. with the allocation
      history of the process: a resumed run's rollout log-probs drifted from the uninterrupted run's, and with two
      threads allocating concurrently (the asynchronous producer) the addresses, hence the bits, depend on timing.
      MKL reads it at its first call.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def _load(name: str):
    module_path = COMMANDS[name][0]
    if name in TORCH_COMMANDS:
        _torch_environment()
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:  # a missing optional dependency of that command
        raise SystemExit(f"openrlhf-search {name}: cannot import {module_path}: {exc}") from exc


def _version() -> str:
    try:
        return importlib.metadata.version("openrlhf-search")
    except importlib.metadata.PackageNotFoundError:  # a source checkout that is not installed
        return "unknown (not installed)"


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openrlhf-search",
                                     description="Train and evaluate LLM search agents with RL; retrieval server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            _load(name).add_arguments(p)
    return parser



def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if next((a for a in argv if not a.startswith("-")), None) in TORCH_COMMANDS:
        _torch_environment()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return int(_load(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
