"""User plugins: modules every process imports before it resolves a registry name.

List them in the config's top-level ``plugins:`` (module paths, e.g. ``[my_project.rl_plugins]``, or ``.py`` files).
A plugin module registers what it adds with the registries of :mod:`openrlhf_search.registry` (a loss, an advantage
estimator or post-processor, a reward, a template, a tool, a retriever kind). The list travels in every derived
config (the OpenRLHF agent config, the patch config, the Megatron backend config), and each process calls
:func:`load_plugins` first: the local trainer, the OpenRLHF agent in every vLLM actor, the patched OpenRLHF training
actors and experience maker, and the Megatron actors. So a new estimator or post-processor runs on every backend
without touching the launcher. The module must be importable in every process (installed, or on ``PYTHONPATH``,
which the OpenRLHF entrypoint forwards to the Ray workers).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path


class PluginError(ValueError):
    """A plugin module that cannot be imported (the message names it and the cause)."""


def load_plugins(modules: Iterable[str] | None, source: str = "plugins") -> list[str]:
    """Import every module of ``modules`` (dotted paths or ``.py`` files) once; return the imported names.

    Raises:
        PluginError: a module cannot be found or raises on import (message: ``source``, the module, the cause).
    """
    done = []
    for name in modules or ():
        name = str(name).strip()
        if not name:
            continue
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                mod_name = f"openrlhf_search_plugin_{path.stem}"
                if mod_name not in sys.modules:
                    spec = importlib.util.spec_from_file_location(mod_name, path)
                    if spec is None or spec.loader is None or not path.is_file():
                        raise FileNotFoundError(f"no such file: {path}")
                    module = importlib.util.module_from_spec(spec)
                    sys.modules[mod_name] = module
                    try:
                        spec.loader.exec_module(module)
                    except BaseException:
                        sys.modules.pop(mod_name, None)
                        raise
            else:
                importlib.import_module(name)
        except Exception as exc:
            raise PluginError(f"{source}: cannot import plugin {name!r}: {type(exc).__name__}: {exc}") from exc
        done.append(name)
    return done
