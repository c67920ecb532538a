#!/usr/bin/env bash
# One table: local trainer on CUDA (bf16), Megatron engine at TP=1, chunked log-prob kernel at V=151,936.
#
#   scripts/gpu_check.sh                      # run the check (CPU fallback: says which rows were not on a GPU)
#   scripts/gpu_check.sh --prepare            # here, with network: fill .gpu_check_wheels/ (megatron-core, mbridge,
#                                             # bm25s, PyStemmer for cp312 x86_64; ~3.5 MB) for a bare GPU machine
#   scripts/gpu_check.sh --checks kernel      # extra arguments go to python -m openrlhf_search.gpu_check
#
# On the GPU machine (no network) the wheels of .gpu_check_wheels/ that are not installed there are installed with
# pip --no-deps --no-index first; the package itself is used from the working tree (PYTHONPATH). Exit 0 = all PASS.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${GPU_CHECK_WHEELS:-${REPO_ROOT}/.gpu_check_wheels}"
PYTHON="${PYTHON:-python3}"
cd "${REPO_ROOT}"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OPENRLHF_SEARCH_STRICT_DEVICES="${OPENRLHF_SEARCH_STRICT_DEVICES:-1}"  # read by the CPU shims only

if [[ "${1:-}" == "--prepare" ]]; then
    exec "${PYTHON}" -m openrlhf_search.gpu_check --prepare "${WHEELS}"
fi

if [[ -d "${WHEELS}" ]]; then
    read -r -a missing <<<"$("${PYTHON}" -m openrlhf_search.gpu_check --missing-wheels "${WHEELS}")"
    if ((${#missing[@]})); then
        "${PYTHON}" -m pip install --quiet --no-deps --no-index "${missing[@]}"
    fi
fi

start=$(date +%s)
status=0
"${PYTHON}" -m openrlhf_search.gpu_check "$@" || status=$?
echo "scripts/gpu_check.sh: wall time $(($(date +%s) - start)) s, exit ${status}"
exit "${status}"
