#!/usr/bin/env bash
# Qwen2.5-14B-Instruct on TWO OR MORE nodes with 8 x 80 GB GPUs each (NODES, default 2), colocated:
# NODES x 8 DeepSpeed ZeRO-3 ranks (gradient checkpointing, Adam states offloaded to CPU RAM: ~170 GB per node)
# + NODES x 4 vLLM engines with tensor parallelism 2. Run it on the Ray head node of a running cluster
# (ray_multinode.sh or slurm_openrlhf.sbatch) with RAY_ADDRESS set. GPU-only: not verified on CPU CI.
#
#   RAY_ADDRESS=auto RETRIEVAL_URL=http://head-node:8000 examples/scripts/openrlhf/qwen2.5_14b_2nodes.sh calibadv
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

ALGORITHM="${1:-dspo}"
shift || true
NODES="${NODES:-2}"
# Multi-node: OpenRLHF's trainer actor reads the prompts and the actor ranks write checkpoints wherever Ray places
# them, so the run directory must be one filesystem mounted at the same path on every node.
: "${OUTPUT_DIR:?set OUTPUT_DIR to a per-run directory on a filesystem every node mounts}"
export OUTPUT_DIR
exec "${SCRIPT_DIR}/train.sh" "${ALGORITHM}" \
    "model.path=${MODEL:-Qwen/Qwen2.5-14B-Instruct}" \
    "openrlhf.retrieval_url=${RETRIEVAL_URL:?set RETRIEVAL_URL to a server reachable from every node}" \
    "openrlhf.ray_address=${RAY_ADDRESS:-auto}" "openrlhf.shared_dir=${SHARED_DIR:-${OUTPUT_DIR}/openrlhf}" \
    "openrlhf.cluster_nodes=${NODES}" openrlhf.cluster_gpus_per_node=8 \
    "openrlhf.actor_num_nodes=${NODES}" openrlhf.actor_num_gpus_per_node=8 \
    "openrlhf.ref_num_nodes=${NODES}" openrlhf.ref_num_gpus_per_node=8 \
    "openrlhf.vllm_num_engines=$((NODES * 4))" openrlhf.vllm_tensor_parallel_size=2 \
    openrlhf.vllm_gpu_memory_utilization=0.4 openrlhf.colocate_all=true openrlhf.vllm_enable_sleep=true \
    openrlhf.zero_stage=3 openrlhf.gradient_checkpointing=true openrlhf.adam_offload=true \
    openrlhf.micro_train_batch_size=1 openrlhf.micro_rollout_batch_size=4 \
    "$@"
