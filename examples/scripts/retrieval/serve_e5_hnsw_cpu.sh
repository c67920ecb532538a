#!/usr/bin/env bash
# Dense retrieval with e5-base-v2 and an approximate HNSW FAISS index on CPU (no GPU needed for serving).
#
#   CORPUS=data/wiki-18.jsonl ENCODER=/models/e5-base-v2 INDEX=indexes/wiki18-e5-hnsw \
#       examples/scripts/retrieval/serve_e5_hnsw_cpu.sh
#
# Encoding the corpus is the slow part (ENCODE_DEVICE=cuda on a GPU machine for wiki-18); HNSW over 21M x 768
# needs ~70 GB RAM and answers a query in a few ms on 16+ cores. Serving verified here only on small corpora.
set -euo pipefail

CORPUS="${CORPUS:?set CORPUS to a corpus .jsonl ({id, contents})}"
ENCODER="${ENCODER:?set ENCODER to a local e5-base-v2 directory}"
INDEX="${INDEX:-indexes/e5-hnsw}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"

if [[ ! -f "${INDEX}/manifest.json" ]]; then
    openrlhf-search index --method dense --index-type hnsw --encoder "${ENCODER}" --device "${ENCODE_DEVICE:-cpu}" \
        --corpus "${CORPUS}" --out "${INDEX}"
fi
exec openrlhf-search serve --index "${INDEX}" --host "${HOST}" --port "${PORT}"
