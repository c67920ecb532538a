"""Session-finish checks shared by the conftests: in a run that must not skip, each skip is named and fails it.

``tests/conftest.py`` (``OPENRLHF_SEARCH_NO_SKIP=1``: no skip but a missing GPU or the OpenRLHF layer) and
``tests/integrations/openrlhf/conftest.py`` (``OPENRLHF_SEARCH_OPTIN_STRICT=1``: no skipped opt-in test) decide
which skips count; reading the skips and failing the run is done here, once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def skipped_reports(session) -> Iterator[tuple[pytest.TestReport | pytest.CollectReport, str]]:
    """``(report, reason)`` of every skip of the session: skipped tests and test modules skipped at import."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for rep in getattr(reporter, "stats", {}).get("skipped", []):
        yield rep, rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)


def source_marks_openrlhf(session, nodeid: str) -> bool:
    """Whether the test file of ``nodeid`` marks tests ``openrlhf`` (so it may skip itself at import)."""
    path = session.config.rootpath / nodeid.split("::")[0]
    return path.is_file() and "mark.openrlhf" in path.read_text(errors="replace")


def fail_on_skips(session, header: str, skipped: list[str]) -> None:
    """If ``skipped`` is not empty: print ``header`` and one line per skip (red) and make the run fail."""
    if not skipped:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in [header, *(f"  {s}" for s in skipped)]:
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:  # pragma: no cover
            print(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
