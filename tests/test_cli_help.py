"""The command line's own texts: ``--version``, help without reStructuredText markup, one-line override errors."""

from __future__ import annotations

import contextlib
import io

import pytest

from openrlhf_search.cli import COMMANDS, main


def _output(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue()


def test_version():
    code, text = _output(["--version"])
    assert code == 0 and text.startswith("openrlhf-search ")


@pytest.mark.parametrize("argv", [[], *([name] for name in COMMANDS)])
def test_help_has_no_rst_markup(argv):
    code, text = _output([*argv, "--help"])
    assert code == 0 and "usage:" in text
    assert "`" not in text, [line for line in text.splitlines() if "`" in line]


def test_an_override_without_equals_is_one_line(tmp_path, capsys):
    """Reproduced by ``openrlhf-search quickstart steps 40`` (an IndexError traceback)."""
    code = main(["train", "--dry-run", "steps", "40", f"logging.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "override 'steps': expected section.key=value" in err and "override '40'" in err
