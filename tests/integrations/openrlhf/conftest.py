"""OpenRLHF tests run the way OpenRLHF runs on a CPU machine: with the project's CPU shim installed.

In the main environment (no ``openrlhf``) nothing happens and the ``openrlhf``-marked modules skip themselves.
"""

import importlib.util

if importlib.util.find_spec("openrlhf") is not None:
    import torch

    if not torch.cuda.is_available():
        from openrlhf_search.integrations.openrlhf.cpu_shim import install

        install(force=True)
