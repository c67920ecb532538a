#!/usr/bin/env bash
# Dense retrieval with e5-base-v2 and an exact (Flat) FAISS index on GPU -- Search-R1's setting.
#
#   CORPUS=data/wiki-18.jsonl ENCODER=/models/e5-base-v2 INDEX=indexes/wiki18-e5-flat \
#       examples/scripts/retrieval/serve_e5_flat_gpu.sh
#
# Assumes faiss-gpu (docker/Dockerfile.retrieval with FAISS=gpu) and 1-2 GPUs: encoding wiki-18 takes ~2 h on one
# A100; the Flat index of 21M x 768 float32 vectors is ~61 GB (shard over 2 x 80 GB GPUs, or use HNSW on CPU).
# GPU-only: not verified on this project's CPU CI.
set -euo pipefail

CORPUS="${CORPUS:?set CORPUS to a corpus .jsonl ({id, contents})}"
ENCODER="${ENCODER:?set ENCODER to a local e5-base-v2 directory (queries are prefixed with 'query: ')}"
INDEX="${INDEX:-indexes/e5-flat}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1}"

if [[ ! -f "${INDEX}/manifest.json" ]]; then
    openrlhf-search index --method dense --index-type flat --encoder "${ENCODER}" --device cuda --fp16 \
        --corpus "${CORPUS}" --out "${INDEX}"
fi
exec openrlhf-search serve --index "${INDEX}" --host "${HOST}" --port "${PORT}"
