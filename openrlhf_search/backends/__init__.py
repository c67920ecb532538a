"""Backends: where a training run happens, selected by the config's one ``backend`` word.

A backend is three steps, each typed and testable on its own::

    problems = backend.validate(cfg, options)   # every problem, one line each, before any expensive work
    plan = backend.plan(cfg, options)           # what will run (printed by ``train --dry-run``), no side effects
    code = backend.run(plan, options)           # run it; the exit code

Built in (registered when this package is imported): ``local`` (this process:
:mod:`openrlhf_search.trainer.backend`), ``openrlhf`` (Ray + vLLM + OpenRLHF's
actors, ``openrlhf.strategy`` picks DeepSpeed or Megatron actors) and ``megatron`` (the OpenRLHF backend with
Megatron actors), both in :mod:`openrlhf_search.integrations.openrlhf.backend`. A plugin registers another with
``BACKENDS.add("name", MyBackend())`` and, if it has options, its own config section
(:func:`openrlhf_search.config.section`); ``backend: name`` then selects it.
"""

from openrlhf_search.backends.base import BACKENDS, Backend, Plan, RunOptions
from openrlhf_search.integrations.openrlhf import backend as _openrlhf  # noqa: F401  (registers openrlhf, megatron)
from openrlhf_search.trainer import backend as _local  # noqa: F401  (registers local)

__all__ = ["BACKENDS", "Backend", "Plan", "RunOptions"]
