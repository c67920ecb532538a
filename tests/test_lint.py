"""The code base is ruff-clean (line length 119, config in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[test])")
    out = subprocess.run([ruff, "check", "openrlhf_search", "tests", "benchmarks", "setup.py"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_version_importable():
    out = subprocess.run([sys.executable, "-c", "import openrlhf_search; print(openrlhf_search.__version__)"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip()
