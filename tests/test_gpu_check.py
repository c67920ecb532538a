"""scripts/gpu_check.sh and ``python -m openrlhf_search.gpu_check`` on CPU (no GPU here: nothing GPU is claimed).

Fast: the kernel row at a small size, the sampling and bf16 rows on a logical GPU (strict proxy), the table's "not
run on a GPU" line, the wheel selection and installation (pip --target, unzip fallback), a failing install that must
not stop the rows, and the argument check. Slow: the whole script on CPU (6 rows, ~3 min on 2 cores), which must pass
and say no row ran on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
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
    assert "Rows NOT run on a GPU: 1, 2, 3, 4, 5, 6" in res.stdout
    assert res.stdout.count("| PASS ") == 6


def test_gpu_check_sampling_and_bf16_rows_on_a_logical_gpu():
    """On CPU the rows run under the strict proxy on a logical GPU: the rows that catch a host sampler (crash at the
    first sampled token on CUDA) and a bf16 optimizer that loses small updates."""
    from openrlhf_search.integrations.strict_devices import strict_devices

    with strict_devices():
        gpu_check._LOGICAL_GPU[:] = [True]
        try:
            sampling = gpu_check.check_hf_sampling(Path("."))
            bf16 = gpu_check.check_bf16_small_lr(Path("."), steps=3)
        finally:
            gpu_check._LOGICAL_GPU.clear()
    assert sampling.status == "PASS" and sampling.figures["sampler_device"] == "cuda", sampling
    assert "logical cuda" in sampling.device
    assert bf16.status == "PASS" and bf16.figures["trained_weights_moved"] > 0.5, bf16
    assert bf16.figures["plain_bf16_adamw_moved"] < 0.2  # what the row contrasts with


def test_gpu_check_rows_fail_on_the_planted_defects(monkeypatch):
    """Planted: the sampler on the host (a CUDA run crashes) and plain AdamW on bf16 parameters."""
    import torch

    from openrlhf_search.integrations.strict_devices import strict_devices
    from openrlhf_search.rollout import hf
    from openrlhf_search.trainer import models

    original = hf.HFEngine.__init__

    def host_sampler(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.generator = torch.Generator(device="cpu").manual_seed(0)

    monkeypatch.setattr(hf.HFEngine, "__init__", host_sampler)
    monkeypatch.setattr(models, "build_optimizer", lambda params, lr, **kw: torch.optim.AdamW(params, lr=lr))
    with strict_devices():
        gpu_check._LOGICAL_GPU[:] = [True]
        try:
            with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
                gpu_check.check_hf_sampling(Path("."))
            assert gpu_check.check_bf16_small_lr(Path("."), steps=3).status == "FAIL"
        finally:
            gpu_check._LOGICAL_GPU.clear()


def _wheel(directory: Path, name: str) -> Path:
    """A minimal pure-Python wheel of module ``name`` (version 1.0)."""
    path = directory / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_gpu_check_installs_wheels_into_a_target_never_the_system(tmp_path, monkeypatch):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_fake_a")
    monkeypatch.setattr(gpu_check, "WHEELS", {"gpucheck-fake-a==1.0": "gpucheck_fake_a"})
    report = gpu_check.install_wheels(wheels, site)
    assert report.startswith("gpu_check: pip installed 1 wheel(s)") and (site / "gpucheck_fake_a").is_dir()

    def refused(*args, **kwargs):  # e.g. a Python without pip, or pip refusing the environment
        return subprocess.CompletedProcess(args, 1, "", "error: externally-managed-environment")

    monkeypatch.setattr(subprocess, "run", refused)
    other = tmp_path / "site2"
    report = gpu_check.install_wheels(wheels, other)
    assert "externally-managed-environment" in report and "unpacked 1 wheel(s)" in report
    assert (other / "gpucheck_fake_a" / "__init__.py").read_text() == "VALUE = 42\n"


def test_gpu_check_script_runs_the_rows_when_the_install_fails(tmp_path):
    """A broken wheel folder is reported and the rows still run (no `set -e` exit before the table)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "bm25s-0.3.16-py3-none-any.whl").write_bytes(b"not a zip")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(tmp_path / "s"))
    code = ("import sys; from openrlhf_search import gpu_check; gpu_check.missing_wheels = lambda d: "
            "sorted(d.glob('*.whl')); sys.exit(gpu_check.main(sys.argv[1:]))")
    shim = tmp_path / "python"  # the wrapper's PYTHON: the real interpreter with the missing-wheel probe forced
    shim.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then shift 2; fi\nexec {sys.executable} -c "{code}" "$@"\n')
    shim.chmod(0o755)
    env["PYTHON"] = str(shim)
    res = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--checks", "kernel"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=str(ROOT))  # fmt: skip
    assert "installing the wheels of" in res.stderr and "failed" in res.stderr, res.stderr[-3000:]
    assert "== openrlhf-search GPU check ==" in res.stdout and "| PASS " in res.stdout, res.stdout[-3000:]
    assert res.returncode == 0
