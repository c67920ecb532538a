#!/usr/bin/env bash
# Qwen2.5-14B, Megatron backend, 2 nodes x 8 GPUs (80 GB), Ray cluster started by hand.
#   head node:    RAY_ROLE=head   bash qwen2.5_14b_2nodes_ray.sh
#   worker node:  RAY_ROLE=worker HEAD_IP=<head ip> bash qwen2.5_14b_2nodes_ray.sh
# Layout: the Megatron backend cannot colocate vLLM with training (docs/megatron.md), so node 1 trains and node 2
# generates. Training: TP 4 (8 KV heads / 4) x PP 2 (48 layers -> 24 per stage) x DP 1, sequence parallel, full
# recompute, distributed optimizer. Memory per training GPU (bf16 params, fp32 grads + Adam main/m/v): params
# 14.8e9*2 B/8 = 3.7 GB, grads 7.4 GB, optimizer 14.8e9*12 B/8 = 22.2 GB, activations (4k tokens, recompute) ~6 GB
# => ~40 GB of 80. vLLM: 4 engines x TP 2 on node 2 at 90% memory (weights 14.8 GB per engine + KV cache).
# Written for GPUs, NOT verified on this project's CPU CI.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${RAY_ROLE:=head}"
: "${RAY_PORT:=6379}"

if [[ "${RAY_ROLE}" == "worker" ]]; then
  : "${HEAD_IP:?set HEAD_IP to the head node address}"
  exec ray start --address "${HEAD_IP}:${RAY_PORT}" --num-gpus 8 --block
fi

: "${MODEL:?set MODEL to a local Qwen2.5-14B-Instruct directory (huggingface-cli download --local-dir)}"
# The head's address (HEAD_IP, else the first address of `hostname -I`) is Ray's node address and the retriever's:
# the agents run in vLLM engines on every node, so the server must listen there, e.g. on the head node
#   openrlhf-search serve --index INDEX --host "${HEAD_IP}" --port 8000 &
: "${HEAD_IP:=$(hostname -I | awk '{print $1}')}"
ray start --head --node-ip-address "${HEAD_IP}" --port "${RAY_PORT}" --num-gpus 8
export MODEL NNODES=2 TRAIN_NODES=1 GPUS_PER_NODE=8 TP=4 PP=2 VPP=null
export VLLM_TP=2 VLLM_MEM=0.9 RECOMPUTE=full MICRO_BATCH=1
export RETRIEVAL_URL="${RETRIEVAL_URL:-http://${HEAD_IP}:8000}"
exec bash "${HERE}/run_megatron_grpo.sh" "$@"
