#!/usr/bin/env bash
# Launch one OpenRLHF training run of a search agent (the per-model scripts next to this file call it).
#
#   examples/scripts/openrlhf/train.sh ALGORITHM [section.key=value ...]
#
# ALGORITHM: grpo | dapo | gspo | dspo | sapo | calibadv | dspo+calibadv | sapo+calibadv | dr_grpo
# Environment: CONFIG (default configs/search_r1.yaml), OUTPUT_DIR, DRY_RUN=1 (print the OpenRLHF command only),
# PYTHON (interpreter with openrlhf_search and OpenRLHF 0.11.2 installed, e.g. in docker/Dockerfile.train).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-${SCRIPT_DIR}/configs/search_r1.yaml}"
PYTHON="${PYTHON:-python}"

if [[ $# -lt 1 ]]; then
    echo "usage: $0 ALGORITHM [section.key=value ...]" >&2
    exit 2
fi
ALGORITHM="$1"
shift
case "${ALGORITHM}" in
    grpo | dapo | gspo | dspo | sapo | calibadv | dspo+calibadv | sapo+calibadv | dr_grpo) ;;
    *)
        echo "$0: unknown algorithm '${ALGORITHM}'" >&2
        exit 2
        ;;
esac

run_name="${ALGORITHM//+/_}-$(date +%Y%m%d-%H%M%S)"
launch_args=(--config "${CONFIG}")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    launch_args+=(--dry-run)
fi
exec "${PYTHON}" -m openrlhf_search train --backend openrlhf "${launch_args[@]}" \
    "algorithm.name=${ALGORITHM}" "logging.output_dir=${OUTPUT_DIR:-runs/openrlhf/${run_name}}" "$@"
