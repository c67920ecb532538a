#!/usr/bin/env bash
# Qwen2.5-32B, Megatron backend, 4 nodes x 8 GPUs (80 GB), Ray cluster started by hand.
#   head node:    RAY_ROLE=head   bash qwen2.5_32b_4nodes_ray.sh
#   worker nodes: RAY_ROLE=worker HEAD_IP=<head ip> bash qwen2.5_32b_4nodes_ray.sh
# Layout: the Megatron backend cannot colocate vLLM with training (docs/megatron.md), so nodes 1-2 train and nodes
# 3-4 generate. Training: TP 8 (one node; 8 KV heads / 8) x PP 2 (64 layers, VPP 2 -> 16-layer chunks) x DP 1,
# sequence parallel, full recompute, distributed optimizer. Memory per training GPU: params 32.8e9*2 B/16 = 4.1 GB,
# fp32 grads 8.2 GB, optimizer 32.8e9*12 B/16 = 24.6 GB, activations (4k tokens, recompute) ~6 GB => ~43 GB of 80.
# vLLM: 4 engines x TP 4 on nodes 3-4 at 90% memory (weights 16.4 GB per GPU + KV cache).
# Written for GPUs, NOT verified on this project's CPU CI.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${RAY_ROLE:=head}"
: "${RAY_PORT:=6379}"

if [[ "${RAY_ROLE}" == "worker" ]]; then
  : "${HEAD_IP:?set HEAD_IP to the head node address}"
  exec ray start --address "${HEAD_IP}:${RAY_PORT}" --num-gpus 8 --block
fi

: "${MODEL:?set MODEL to a local Qwen2.5-32B-Instruct directory (huggingface-cli download --local-dir)}"
# The head's address (HEAD_IP, else the first address of `hostname -I`) is Ray's node address and the retriever's:
# the agents run in vLLM engines on every node, so the server must listen there, e.g. on the head node
#   openrlhf-search serve --index INDEX --host "${HEAD_IP}" --port 8000 &
: "${HEAD_IP:=$(hostname -I | awk '{print $1}')}"
ray start --head --node-ip-address "${HEAD_IP}" --port "${RAY_PORT}" --num-gpus 8
export MODEL NNODES=4 TRAIN_NODES=2 GPUS_PER_NODE=8 TP=8 PP=2 VPP=2
export VLLM_TP=4 VLLM_MEM=0.9 RECOMPUTE=full MICRO_BATCH=1
export RETRIEVAL_URL="${RETRIEVAL_URL:-http://${HEAD_IP}:8000}"
exec bash "${HERE}/run_megatron_grpo.sh" "$@"
