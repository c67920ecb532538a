#!/usr/bin/env bash
# BM25 retrieval server on CPU (bm25s): build the index once, then serve the Search-R1 /retrieve protocol.
#
#   CORPUS=data/wiki-18.jsonl INDEX=indexes/wiki18-bm25 PORT=8000 examples/scripts/retrieval/serve_bm25.sh
#
# Resources: wiki-18 (21M passages) needs ~30 GB RAM to index and ~12 GB to serve; indexing takes ~1 h on 16 cores.
# HOST=0.0.0.0 exposes the server to the other nodes of a multi-node run (it has no auth unless TOKEN is set).
set -euo pipefail

CORPUS="${CORPUS:?set CORPUS to a corpus .jsonl ({id, contents})}"
INDEX="${INDEX:-indexes/bm25}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"

if [[ ! -f "${INDEX}/manifest.json" ]]; then
    openrlhf-search index --method bm25 --corpus "${CORPUS}" --out "${INDEX}"
fi
token_args=()
if [[ -n "${TOKEN:-}" ]]; then
    token_args=(--token "${TOKEN}")
fi
exec openrlhf-search serve --index "${INDEX}" --host "${HOST}" --port "${PORT}" "${token_args[@]}"
