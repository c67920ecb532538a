"""OpenRLHF tests run the way OpenRLHF runs on a CPU machine: with the project's CPU shim installed.

In the main environment (no ``openrlhf``) nothing happens and the ``openrlhf``-marked modules skip themselves.
"""

import importlib.util
import os
from pathlib import Path

import pytest

if importlib.util.find_spec("openrlhf") is not None:
    import torch

    if not torch.cuda.is_available():
        from openrlhf_search.integrations.openrlhf.cpu_shim import install

        install(force=True)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The end-to-end tests' knowledge base, BM25 index and SFT-warm-started tiny model (``openrlhf_e2e_assets``),
    built once, under ``OPENRLHF_SEARCH_E2E_CACHE`` when set (kept across runs) or a temporary directory."""
    from openrlhf_e2e_assets import build_assets

    cache = os.environ.get("OPENRLHF_SEARCH_E2E_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("e2e_assets")
    return build_assets(root / "assets")
