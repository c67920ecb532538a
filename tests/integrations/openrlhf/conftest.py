"""OpenRLHF tests run the way OpenRLHF runs on a CPU machine: with the project's CPU shim installed.

In the main environment (no ``openrlhf``) nothing happens and the ``openrlhf``-marked modules skip themselves.

The opt-in runs (where ``openrlhf`` is installed) are strict by default: ``OPENRLHF_SEARCH_STRICT_DEVICES=1``
(inherited by Ray's workers) puts OpenRLHF's DeepSpeed actors and the Megatron actors under the strict device proxy
(docs/strict-devices.md); set ``OPENRLHF_SEARCH_STRICT_DEVICES=0`` to run them with the plain CPU shim.
"""

import importlib.util
import os
from pathlib import Path

import pytest
from skip_report import fail_on_skips, skipped_reports, source_marks_openrlhf

if importlib.util.find_spec("openrlhf") is not None:
    os.environ.setdefault("OPENRLHF_SEARCH_STRICT_DEVICES", "1")
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


OPTIN_STRICT_ENV = "OPENRLHF_SEARCH_OPTIN_STRICT"
"""Set to 1 by ``scripts/test_openrlhf.sh``: inside the opt-in run a skipped opt-in test is a failure."""


def _skipped_optin(session) -> list[str]:
    """Opt-in tests (marked ``openrlhf``, wherever they live) that were skipped, and test modules whose source marks
    tests ``openrlhf`` but which skipped themselves at import (e.g. ``pytest.importorskip("megatron.core")``)."""
    out = []
    for rep, reason in skipped_reports(session):
        if isinstance(rep, pytest.CollectReport):
            if source_marks_openrlhf(session, rep.nodeid):
                out.append(f"{rep.nodeid} (module skipped: {reason})")
        elif "openrlhf" in rep.keywords:
            out.append(f"{rep.nodeid} ({reason})")
    return out


def pytest_sessionfinish(session, exitstatus):
    """With ``OPENRLHF_SEARCH_OPTIN_STRICT=1``: a piece of the opt-in environment that is missing (a skip) fails the
    run instead of letting it exit 0 with the test unexercised."""
    if os.environ.get(OPTIN_STRICT_ENV) != "1":
        return
    skipped = _skipped_optin(session)
    fail_on_skips(session, f"{OPTIN_STRICT_ENV}=1: {len(skipped)} opt-in test(s) skipped -- the opt-in environment is "
                  "incomplete (scripts/setup_openrlhf_env.sh installs every piece):", skipped)
