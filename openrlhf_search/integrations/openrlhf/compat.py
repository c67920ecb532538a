"""The OpenRLHF version this integration is written against, and the check that guards every patch."""

from __future__ import annotations

import importlib.metadata

OPENRLHF_VERSION = "0.11.2"
"""The only OpenRLHF release :mod:`.patches`, :mod:`.agent` and :mod:`.cpu_shim` were written and tested for."""


def installed_openrlhf_version() -> str | None:
    """The installed ``openrlhf`` distribution's version, or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_openrlhf_version(expected: str = OPENRLHF_VERSION) -> str:
    """Return the installed OpenRLHF version; raise ``RuntimeError`` if it is missing or not ``expected``.

    The patches replace OpenRLHF internals by name (``ActorPPOTrainer.actor_loss_fn``,
    ``RemoteExperienceMaker.compute_advantages_and_returns``...); another release may rename or reorder them, and a
    silently wrong patch trains the wrong objective. Set ``OPENRLHF_SEARCH_ALLOW_VERSION_MISMATCH=1`` to override
    at your own risk.
    """
    import os

    found = installed_openrlhf_version()
    if found is None:
        raise RuntimeError(
            f"openrlhf is not installed; install openrlhf=={expected} (scripts/setup_openrlhf_env.sh or docker/)"
        )
    if found != expected and os.environ.get("OPENRLHF_SEARCH_ALLOW_VERSION_MISMATCH") != "1":
        raise RuntimeError(
            f"openrlhf {found} is installed but openrlhf_search.integrations.openrlhf supports {expected} only; "
            f"install openrlhf=={expected} or set OPENRLHF_SEARCH_ALLOW_VERSION_MISMATCH=1 to try anyway"
        )
    return found


def openrlhf_argument_parser():
    """OpenRLHF's own ``train_ppo_ray`` argument parser, built from its source.

    OpenRLHF 0.11.2 builds the parser inline under ``if __name__ == "__main__":``. We execute exactly those
    statements -- everything before ``args = parser.parse_args()`` -- so flags are validated by OpenRLHF's parser
    and not by a copy of it (the launcher's contract test and :mod:`.entrypoint` rely on this).
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("openrlhf.cli.train_ppo_ray")
    if spec is None or spec.origin is None:
        raise RuntimeError("openrlhf.cli.train_ppo_ray is not importable; is openrlhf installed?")
    source = open(spec.origin, encoding="utf-8").read()
    tree = ast.parse(source, filename=spec.origin)
    main_block = next(
        (n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)), None
    )
    if main_block is None:
        raise RuntimeError(f"{spec.origin}: no `if __name__ == '__main__':` block; unsupported OpenRLHF layout")
    body = []
    for stmt in main_block.body:
        if "parse_args" in ast.unparse(stmt):
            break
        body.append(stmt)
    prelude = ast.parse("import argparse\nfrom datetime import datetime").body
    module = ast.Module(body=[*prelude, *body], type_ignores=[])
    namespace: dict = {}
    exec(compile(module, spec.origin, "exec"), namespace)  # noqa: S102 - OpenRLHF's own parser statements
    if "parser" not in namespace:
        raise RuntimeError(f"{spec.origin}: the __main__ block defines no `parser`; unsupported OpenRLHF layout")
    return namespace["parser"]
