"""scripts/gpu_check.sh and ``python -m openrlhf_search.gpu_check`` on CPU (no GPU here: nothing GPU is claimed).

Fast: the kernel row at a small size, the table's "not run on a GPU" line, the wheel selection and the argument
check. Slow: the whole script on CPU (3 rows, ~1.5-2 min on 2 cores), which must pass and say no row ran on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_search import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_kernel_row_matches_naive_at_full_vocab_on_cpu():
    row = gpu_check.check_logprob_kernel(tokens=24, hidden=16)
    assert row.status == "PASS", row
    assert row.device.startswith("cpu") and str(gpu_check.VOCAB) not in row.check  # printed with separators
    assert "151,936" in row.check
    assert row.figures["logprob_max_abs_diff"] < 1e-4 and row.figures["naive_peak_mib"] is None


def test_gpu_check_table_names_the_rows_not_run_on_a_gpu():
    rows = [gpu_check.Row("a", "cpu float32", "PASS", detail="x"), gpu_check.Row("b", "cuda bf16", "FAIL"),
            gpu_check.Row("c", "-", "SKIP")]  # fmt: skip
    table = gpu_check.format_table(rows, on_gpu=False, strict="absent")
    assert "Rows NOT run on a GPU: 1, 3" in table
    assert "CUDA NOT available" in table and "strict device proxy: absent" in table
    assert table.splitlines()[0].startswith("| # | check")


def test_gpu_check_installs_only_missing_wheels(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "WHEELS", {"torch==9.9": "torch", "no-such-pkg==1.0": "no_such_pkg_xyz"})
    for name in ("torch-9.9-py3-none-any.whl", "no_such_pkg-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in gpu_check.missing_wheels(tmp_path)] == ["no_such_pkg-1.0-py3-none-any.whl"]


def test_gpu_check_unknown_row_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--checks", "kernel,bogus"])
    assert "bogus" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_script_passes_on_cpu_and_says_so(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WHEELS=str(tmp_path / "none"))
    res = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--json", str(tmp_path / "rows.json")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=str(ROOT))  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "Rows NOT run on a GPU: 1, 2, 3" in res.stdout
    assert res.stdout.count("| PASS ") == 3
