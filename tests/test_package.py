"""The package imports on a bare CPU install without pulling any heavy optional dependency."""

import subprocess
import sys

HEAVY = ["ray", "vllm", "deepspeed", "faiss", "openrlhf", "megatron", "sentence_transformers", "flash_attn"]


def test_import_is_light():
    code = (
        "import sys, openrlhf_search, openrlhf_search.cli, openrlhf_search.algorithms, openrlhf_search.rewards;"
        f"bad=[m for m in {HEAVY!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "openrlhf_search", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for cmd in ("index", "serve", "train", "eval", "quickstart"):
        assert cmd in out.stdout
