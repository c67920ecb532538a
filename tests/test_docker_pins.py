"""The Docker images' Python stacks: consistent and resolvable.

Each image lists its Python requirements in ``docker/requirements/<image>*.txt`` (the Dockerfiles install exactly
those files): ``<stage>.txt`` are wheels, ``<stage>-build.txt`` source-only pins compiled in the image against its
torch, ``<stage>-post.txt`` what is installed after them. The fast tests (main suite) check that the Dockerfiles use
those files and that each image's base CUDA version is the one its requirement file declares. The opt-in test
(``pytest -m registry``: it needs PyPI) runs pip's resolver in dry-run mode for the image's Python version and
platform (``--python-version 3.12 --platform manylinux_2_<glibc>_x86_64 ... --only-binary=:all:``) over every file
of the image, and fails on a pin that does not exist or conflicts. Source-only pins cannot enter a ``--platform``
resolution: each is checked to exist on the index (``pip index versions``) and stands in the resolution as an empty
stub wheel of the same name and version (so their *own* dependencies, unpinned generics, are not resolved). The
resolved torch wheel's CUDA runtime must equal the base image's CUDA version.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
REQS = DOCKER / "requirements"


def platforms(glibc_minor: int) -> list[str]:
    """Every manylinux tag an x86_64 image with glibc ``2.<glibc_minor>`` accepts (pip does not widen
    ``--platform`` itself)."""
    return [*(f"manylinux_2_{v}_x86_64" for v in range(glibc_minor, 16, -1)), "manylinux2014_x86_64"]


IMAGES = {
    # image: (Dockerfile, build target or None, python version, glibc 2.x of the base image, requirement stages in
    # install order). Ubuntu 24.04 (the CUDA bases) has glibc 2.39, Debian 12 (python:3.12-slim-bookworm) 2.36;
    # vllm 0.29.0 needs >= 2.31 (llguidance 1.7 ships manylinux_2_31 wheels only).
    "train-openrlhf": ("Dockerfile.train", "openrlhf", "3.12", 39, ["train"]),
    "train-megatron": ("Dockerfile.train", "megatron", "3.12", 39, ["train", "megatron"]),
    "retrieval-cpu": ("Dockerfile.retrieval", None, "3.12", 36, ["retrieval-cpu"]),
    "retrieval-gpu": ("Dockerfile.retrieval", None, "3.12", 39, ["retrieval-gpu"]),
}


def requirements(path: Path) -> list[str]:
    """Requirement lines of ``path`` (comments and blank lines dropped); [] when the file does not exist."""
    if not path.is_file():
        return []
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def declared_cuda(stage: str) -> str | None:
    """The ``# cuda: X.Y`` line of ``<stage>.txt`` (the base image's CUDA version it is written for), or None."""
    m = re.search(r"^# cuda: (\S+)$", (REQS / f"{stage}.txt").read_text(), re.M)
    return m.group(1) if m else None


def base_image_cuda(dockerfile: str, arg: str) -> str | None:
    """CUDA ``X.Y`` of the default of ``ARG <arg>`` in ``dockerfile`` (an ``nvidia/cuda:X.Y.Z-...`` tag), or None."""
    m = re.search(rf"^ARG {arg}=\S*nvidia/cuda:(\d+\.\d+)\.\d+", (DOCKER / dockerfile).read_text(), re.M)
    return m.group(1) if m else None


def test_dockerfiles_install_the_requirement_files():
    for image, (dockerfile, target, _py, _glibc, stages) in IMAGES.items():
        text = (DOCKER / dockerfile).read_text()
        if target:
            assert re.search(rf"^FROM \S+ AS {target}$", text, re.M), f"{dockerfile}: no stage {target!r} ({image})"
        for stage in stages:
            for suffix in ("", "-build", "-post"):
                name = f"requirements/{stage}{suffix}.txt"
                if (DOCKER / name).is_file():
                    assert name in text, f"{dockerfile} does not install docker/{name} ({image})"


def test_base_image_cuda_matches_the_requirements():
    assert base_image_cuda("Dockerfile.train", "BASE_IMAGE") == declared_cuda("train") is not None
    assert base_image_cuda("Dockerfile.retrieval", "GPU_BASE_IMAGE") == declared_cuda("retrieval-gpu") is not None
    assert declared_cuda("retrieval-cpu") is None  # CPU torch wheel, no CUDA base


def _pip_env() -> dict[str, str]:
    """The registry as the image sees it: no local wheel directories, constraint files or extra indexes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_INDEX_URL")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _registry_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        with urllib.request.urlopen(f"{index}/pip/", timeout=10) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stub_wheel(directory: Path, requirement: str) -> None:
    """An empty wheel ``name==version`` (no dependencies) standing in for a source-only pin."""
    name, _, version = requirement.partition("==")
    assert version, f"source-only requirement {requirement!r} must be pinned with =="
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(directory / f"{dist}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\n"
                                      "Tag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def _exists_on_index(requirement: str) -> bool:
    name, _, version = requirement.partition("==")
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True,
                         env=_pip_env(), timeout=120)  # fmt: skip
    listed = re.search(r"Available versions: (.*)", out.stdout)
    return bool(listed) and version in [v.strip() for v in listed.group(1).split(",")]


@pytest.mark.slow
@pytest.mark.registry
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_requirements_resolve(image, tmp_path):
    if not _registry_reachable():
        pytest.skip("package registry not reachable")
    _dockerfile, _target, python, glibc, stages = IMAGES[image]
    wheels, sources = [], []
    for stage in stages:
        wheels += requirements(REQS / f"{stage}.txt") + requirements(REQS / f"{stage}-post.txt")
        sources += requirements(REQS / f"{stage}-build.txt")
    missing = [r for r in sources if not _exists_on_index(r)]
    assert not missing, f"{image}: source-only pins not on the index: {missing}"
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for req in sources:
        _stub_wheel(stubs, req)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--target", str(tmp_path / "target"), "--python-version", python, "--only-binary=:all:",
           "--find-links", str(stubs), "--report", str(report)]  # fmt: skip
    for platform in platforms(glibc):
        cmd += ["--platform", platform]
    out = subprocess.run(cmd + wheels + sources, capture_output=True, text=True, env=_pip_env(), timeout=1200)
    assert out.returncode == 0, f"{image}: pip could not resolve {wheels + sources}:\n{out.stderr[-4000:]}"
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}  # fmt: skip
    for req in wheels + sources:
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?==(\S+)", req)
        if m:
            name = m.group(1).lower().replace("_", "-")
            assert resolved.get(name) == m.group(3), f"{image}: {req} resolved to {resolved.get(name)}"
    cuda = next((declared_cuda(s) for s in stages if declared_cuda(s)), None)
    runtime = {n: v for n, v in resolved.items() if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", n)}
    if cuda is None:
        assert not runtime or image == "retrieval-cpu", f"{image}: CUDA runtime {runtime} without a CUDA base image"
    else:
        assert runtime, f"{image}: no CUDA runtime wheel resolved (torch is not a CUDA build?)"
        assert {".".join(v.split(".")[:2]) for v in runtime.values()} == {cuda}, (
            f"{image}: base image CUDA {cuda} but the resolved CUDA runtime is {runtime}")
    print(f"{image}: {len(resolved)} packages resolve; torch {resolved.get('torch')}, CUDA runtime {runtime}")
