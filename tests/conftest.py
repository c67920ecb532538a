"""Shared pytest setup: GPU tests are skipped on machines without CUDA; with ``OPENRLHF_SEARCH_NO_SKIP=1`` (set by
``scripts/test_all.sh``, the README's test command) any other skip fails the run."""

import os

import pytest

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


def _source_marks_openrlhf(session, nodeid: str) -> bool:
    path = session.config.rootpath / nodeid.split("::")[0]
    return path.is_file() and "mark.openrlhf" in path.read_text(errors="replace")


def unexpected_skips(session) -> list[str]:
    """Skipped tests (and modules skipped at import) whose reason is neither a missing GPU nor the OpenRLHF layer."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    out = []
    for rep in getattr(reporter, "stats", {}).get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if GPU_SKIP_REASON in reason:
            continue
        if "openrlhf" in getattr(rep, "keywords", {}) or _source_marks_openrlhf(session, rep.nodeid):
            continue
        out.append(f"{rep.nodeid}: {reason}")
    return out


def pytest_sessionfinish(session, exitstatus):
    """With ``OPENRLHF_SEARCH_NO_SKIP=1`` a skip for anything a registry provides fails the run, naming each test."""
    if os.environ.get(NO_SKIP_ENV) != "1" or exitstatus not in (0, pytest.ExitCode.OK):
        return
    skipped = unexpected_skips(session)
    if not skipped:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{NO_SKIP_ENV}=1: {len(skipped)} test(s) skipped for something a package registry provides "
             "(scripts/test_all.sh installs every piece):"] + [f"  {s}" for s in skipped]  # fmt: skip
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:  # pragma: no cover
            print(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
