#!/usr/bin/env bash
# One table: local trainer on CUDA (bf16), HF-engine sampling at temperature 1, bf16 at lr 1e-6, LoRA, Megatron
# engine at TP=1, chunked log-prob kernel at V=151,936.
#
#   scripts/gpu_check.sh --prepare            # here, WITH network: fill .gpu_check_wheels/ (megatron-core, mbridge,
#                                             # einops, bm25s, PyStemmer for CPython 3.12 x86_64; ~3.6 MB)
#   scripts/gpu_check.sh                      # the check (no network needed; CPU fallback says which rows were
#                                             # not on a GPU)
#   scripts/gpu_check.sh --checks kernel      # extra arguments go to python -m openrlhf_search.gpu_check
#
# The target machine needs Python 3.12 with torch, transformers, accelerate, peft, safetensors,
# sentence-transformers; nothing else, no network. .gpu_check_wheels/ is git-ignored: it must travel WITH the
# checkout (copy the folder next to scripts/). The wheels whose module is missing there are installed into
# .gpu_check_site/ (pip --target: the system Python is never modified, so an "externally managed" Python is no
# obstacle; without a usable pip the wheels are unpacked), which goes on PYTHONPATH after the working tree.
# A failed install is reported and the rows still run (the rows needing a missing package then SKIP or FAIL
# naming it). Exit 0 = all rows PASS.
set -uo pipefail  # not -e: nothing before the rows may end the script

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${GPU_CHECK_WHEELS:-${REPO_ROOT}/.gpu_check_wheels}"
SITE="${GPU_CHECK_SITE:-${REPO_ROOT}/.gpu_check_site}"
PYTHON="${PYTHON:-python3}"
cd "${REPO_ROOT}" || exit 2
export PYTHONPATH="${REPO_ROOT}:${SITE}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OPENRLHF_SEARCH_STRICT_DEVICES="${OPENRLHF_SEARCH_STRICT_DEVICES:-1}"  # read by the CPU shims only

if [[ "${1:-}" == "--prepare" ]]; then
    exec "${PYTHON}" -m openrlhf_search.gpu_check --prepare "${WHEELS}"
fi

if [[ -d "${WHEELS}" ]]; then
    if ! "${PYTHON}" -m openrlhf_search.gpu_check --install-wheels "${WHEELS}" --target "${SITE}"; then
        echo "scripts/gpu_check.sh: WARNING: installing the wheels of ${WHEELS} failed (above); running the rows" \
            "anyway" >&2
    fi
else
    echo "scripts/gpu_check.sh: WARNING: no ${WHEELS}: rows needing bm25s or megatron-core will SKIP/FAIL naming" \
        "the package; run scripts/gpu_check.sh --prepare where there is network and carry the folder along" >&2
fi

start=$(date +%s)
status=0
"${PYTHON}" -m openrlhf_search.gpu_check "$@" || status=$?
echo "scripts/gpu_check.sh: wall time $(($(date +%s) - start)) s, exit ${status}"
exit "${status}"
