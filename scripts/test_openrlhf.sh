#!/usr/bin/env bash
# Run the OpenRLHF integration tests (contract tests + the CPU end-to-end runs) in the OpenRLHF environment.
#
#   scripts/test_openrlhf.sh                 # all `openrlhf`-marked tests, incl. the two end-to-end runs
#   scripts/test_openrlhf.sh -k contract     # extra arguments go to pytest
#
# Creates the environment first if needed (scripts/setup_openrlhf_env.sh, several minutes). The end-to-end test
# builds its assets (knowledge base, BM25 index, tokenizer, SFT-warm-started tiny model) once into
# OPENRLHF_SEARCH_E2E_CACHE. Runs under `nice` (heavy: Ray + vLLM + DeepSpeed on CPU) and prints its wall time.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENRLHF_VENV:-${REPO_ROOT}/.venvs/openrlhf}"
export OPENRLHF_SEARCH_E2E_CACHE="${OPENRLHF_SEARCH_E2E_CACHE:-${REPO_ROOT}/.venvs/openrlhf-e2e-cache}"

if [[ ! -x "${VENV}/bin/python" ]] || ! "${VENV}/bin/python" -c "import openrlhf, vllm, deepspeed" 2>/dev/null; then
    bash "${REPO_ROOT}/scripts/setup_openrlhf_env.sh" "${VENV}"
fi

cd "${REPO_ROOT}"
start=$(date +%s)
status=0
nice -n 10 "${VENV}/bin/python" -m pytest -m openrlhf tests/integrations/openrlhf -p no:cacheprovider -rA "$@" ||
    status=$?
echo "scripts/test_openrlhf.sh: wall time $(($(date +%s) - start)) s, exit ${status}"
exit "${status}"
