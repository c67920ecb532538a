"""Shared pytest setup: GPU tests are skipped on machines without CUDA; with ``OPENRLHF_SEARCH_NO_SKIP=1`` (set by
``scripts/test_all.sh``, the README's test command) any other skip fails the run."""

import os

import pytest
from skip_report import fail_on_skips, skipped_reports, source_marks_openrlhf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GPU_SKIP_REASON = "needs a CUDA GPU"
NO_SKIP_ENV = "OPENRLHF_SEARCH_NO_SKIP"
"""Set to 1 by ``scripts/test_all.sh``: a skip is allowed only for what no package registry provides (a GPU) or for an
``openrlhf``-marked test, which the OpenRLHF layer of the same script runs in its own environment."""


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: a checkout dir named gpu
            item.add_marker(skip)


def unexpected_skips(session) -> list[str]:
    """Skipped tests (and modules skipped at import) whose reason is neither a missing GPU nor the OpenRLHF layer."""
    return [f"{rep.nodeid}: {reason}" for rep, reason in skipped_reports(session)
            if GPU_SKIP_REASON not in reason and "openrlhf" not in getattr(rep, "keywords", {})
            and not source_marks_openrlhf(session, rep.nodeid)]


def pytest_sessionfinish(session, exitstatus):
    """With ``OPENRLHF_SEARCH_NO_SKIP=1`` a skip for anything a registry provides fails the run, naming each test."""
    if os.environ.get(NO_SKIP_ENV) != "1" or exitstatus not in (0, pytest.ExitCode.OK):
        return
    skipped = unexpected_skips(session)
    fail_on_skips(session, f"{NO_SKIP_ENV}=1: {len(skipped)} test(s) skipped for something a package registry "
                  "provides (scripts/test_all.sh installs every piece):", skipped)
