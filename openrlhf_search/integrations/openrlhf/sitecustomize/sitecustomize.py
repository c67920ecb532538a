"""Loads openrlhf_search's OpenRLHF CPU shim in every Python process started with this directory on PYTHONPATH.

Python imports ``sitecustomize`` at start-up, before any user code: that is how the shim reaches Ray's workers and
the engine-core subprocesses vLLM spawns. It acts only when ``OPENRLHF_SEARCH_CPU_SHIM=1``. Any other
``sitecustomize`` later on ``sys.path`` (this one shadows it) is executed afterwards, so an environment's own
customisation keeps working.
"""

import importlib.machinery
import importlib.util
import os
import sys

if os.environ.get("OPENRLHF_SEARCH_CPU_SHIM") == "1":
    from openrlhf_search.integrations.openrlhf.cpu_shim import install

    install()


def _chain_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or os.path.dirname(os.path.abspath(spec.origin or "")) == here:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_chain_next_sitecustomize()
