#!/usr/bin/env bash
# Qwen2.5-3B-Instruct on ONE node with 8 GPUs (>= 40 GB each, e.g. A100-40GB/L40S), everything colocated:
# 8 DeepSpeed ZeRO-2 ranks + 8 vLLM engines (TP 1, 45% of GPU memory while rolling out, asleep while training).
# Needs a retrieval server at RETRIEVAL_URL (examples/scripts/retrieval/). GPU-only: not verified on CPU CI.
#
#   RETRIEVAL_URL=http://127.0.0.1:8000 examples/scripts/openrlhf/qwen2.5_3b_1node.sh dspo
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

ALGORITHM="${1:-dspo}"
shift || true
exec "${SCRIPT_DIR}/train.sh" "${ALGORITHM}" \
    "model.path=${MODEL:-Qwen/Qwen2.5-3B-Instruct}" \
    "openrlhf.retrieval_url=${RETRIEVAL_URL:-http://127.0.0.1:8000}" \
    openrlhf.actor_num_nodes=1 openrlhf.actor_num_gpus_per_node=8 \
    openrlhf.ref_num_nodes=1 openrlhf.ref_num_gpus_per_node=8 \
    openrlhf.vllm_num_engines=8 openrlhf.vllm_tensor_parallel_size=1 openrlhf.vllm_gpu_memory_utilization=0.45 \
    openrlhf.colocate_all=true openrlhf.vllm_enable_sleep=true openrlhf.zero_stage=2 \
    openrlhf.micro_train_batch_size=4 openrlhf.micro_rollout_batch_size=16 \
    "$@"
