#!/usr/bin/env bash
# Run the OpenRLHF integration tests (contract tests + the CPU end-to-end runs) in the OpenRLHF environment.
#
#   scripts/test_openrlhf.sh                 # every `openrlhf`-marked test under tests/, wherever it lives
#   scripts/test_openrlhf.sh -k contract     # extra arguments go to pytest
#
# Strict device proxy on by default (tests/integrations/openrlhf/conftest.py; OPENRLHF_SEARCH_STRICT_DEVICES=0 to turn
# it off; docs/strict-devices.md).
# A skipped opt-in test FAILS the run (OPENRLHF_SEARCH_OPTIN_STRICT=1, checked in tests/integrations/openrlhf/
# conftest.py): inside the opt-in environment a skip means a missing piece (e.g. megatron-core), not "not applicable".
# This checkout's package is imported (PYTHONPATH), not whatever the venv's editable install points at.
#
# Creates the environment first if needed (scripts/setup_openrlhf_env.sh, several minutes). The end-to-end test
# builds its assets (knowledge base, BM25 index, tokenizer, SFT-warm-started tiny model) once into
# OPENRLHF_SEARCH_E2E_CACHE. Runs under `nice` (heavy: Ray + vLLM + DeepSpeed on CPU) and prints its wall time.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENRLHF_VENV:-${REPO_ROOT}/.venvs/openrlhf}"
export OPENRLHF_SEARCH_OPTIN_STRICT=1
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export OPENRLHF_SEARCH_E2E_CACHE="${OPENRLHF_SEARCH_E2E_CACHE:-${REPO_ROOT}/.venvs/openrlhf-e2e-cache}"

if [[ ! -x "${VENV}/bin/python" ]] || ! "${VENV}/bin/python" -c "import openrlhf, vllm, deepspeed, megatron.core, mbridge, hypothesis" 2>/dev/null; then
    bash "${REPO_ROOT}/scripts/setup_openrlhf_env.sh" "${VENV}"
fi

cd "${REPO_ROOT}"
# DeepSpeed JIT-compiles its CPU ops (Adam, shared-memory comm) into torch's extension cache on first use. torch
# rebuilds an op whenever its include paths change, so checkouts sharing ~/.cache/torch_extensions rebuild each
# other's ops and wait on each other's build locks: each checkout gets its own cache (one build, ~1-2 min).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${REPO_ROOT}/.venvs/torch-extensions}"
# A run killed while DeepSpeed JIT-compiled an op leaves torch's build lock; later runs then wait on it forever
# (torch's FileBaton has no timeout). A lock older than 10 minutes belongs to no live build: remove it, loudly.
ext_dir="${TORCH_EXTENSIONS_DIR}"
if [[ -d "${ext_dir}" ]]; then
    while IFS= read -r lock; do
        echo "scripts/test_openrlhf.sh: removing a stale torch extension build lock: ${lock}" >&2
        rm -f "${lock}"
    done < <(find "${ext_dir}" -name lock -mmin +10 2>/dev/null)
fi
start=$(date +%s)
# Build DeepSpeed's CPU ops here, once, outside Ray: inside the first run they would compile in an actor (and an
# actor killed mid-build -- timeout, memory pressure -- leaves torch's build lock behind). Seconds when built.
nice -n 10 "${VENV}/bin/python" -c "from deepspeed.ops.op_builder.cpu import FusedAdamBuilder, ShareMemCommBuilder
for builder in (FusedAdamBuilder(), ShareMemCommBuilder()):
    builder.load(verbose=False)" 2>&1 | grep -v -e "FutureWarning" -e "import pynvml" -e "Setting accelerator" || true
status=0
nice -n 10 "${VENV}/bin/python" -m pytest -m openrlhf tests -p no:cacheprovider -rA "$@" ||
    status=$?
echo "scripts/test_openrlhf.sh: wall time $(($(date +%s) - start)) s, exit ${status}"
exit "${status}"
