"""OpenRLHF backend: train search agents with OpenRLHF's Ray + vLLM + DeepSpeed pipeline (pinned version).

The project plugs into OpenRLHF without copying it:

* :mod:`.agent` -- our search environment as OpenRLHF's agent executor (runs inside every vLLM rollout actor);
* :mod:`.patches` -- the one module that touches OpenRLHF internals: our policy losses (e.g. SAPO) and CalibAdv
  injected into OpenRLHF's training actors, after checking the installed version;
* :mod:`.launch` -- builds and runs OpenRLHF's ``train_ppo_ray`` command from our config;
* :mod:`.cpu_shim` -- lets the real pipeline run on a machine without CUDA (tests, demos).

Importing this package is light: OpenRLHF, Ray, vLLM and torch are imported only by the modules that need them.
"""

from .compat import OPENRLHF_VERSION, check_openrlhf_version

__all__ = ["OPENRLHF_VERSION", "check_openrlhf_version"]
