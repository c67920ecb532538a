"""``openrlhf-search serve``: serve an index over HTTP with Search-R1's ``POST /retrieve`` protocol.

Example::

    openrlhf-search serve --index indexes/wiki-bm25 --corpus wiki-18.jsonl --port 8000
    curl -s 127.0.0.1:8000/retrieve -d '{"queries": ["who wrote hamlet"], "topk": 3, "return_scores": true}'

``--corpus`` makes the server check the corpus against the index manifest (size, then SHA-256) and refuse to
start on a mismatch. The bearer token can come from ``--token`` or the ``OPENRLHF_SEARCH_TOKEN`` variable (which
keeps it out of ``ps``).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

TOKEN_ENV = "OPENRLHF_SEARCH_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .server import ServerConfig

    d = ServerConfig()
    parser.add_argument("--index", required=True, help="index directory written by `openrlhf-search index`")
    parser.add_argument("--corpus", default=None, help="corpus file to check against the index manifest")
    parser.add_argument("--host", default=d.host, help=f"bind address (default {d.host}, loopback only)")
    parser.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port})")
    parser.add_argument("--token", default=None, help=f"require 'Authorization: Bearer TOKEN' (or set ${TOKEN_ENV})")
    parser.add_argument("--default-topk", type=int, default=d.default_topk, help="topk when a request omits it")
    parser.add_argument("--max-topk", type=int, default=d.max_topk, help="largest accepted topk")
    parser.add_argument("--max-queries", type=int, default=d.max_queries_per_request, help="max queries per request")
    parser.add_argument("--max-query-chars", type=int, default=d.max_query_chars, help="max characters per query")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="max request body size")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                        help="micro-batching: how long to wait for more requests after the first")
    parser.add_argument("--max-batch", type=int, default=d.max_batch_queries, help="max queries per retrieval call")
    parser.add_argument("--n-threads", type=int, default=0, help="BM25 retrieval threads (0: all cores)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from . import load_retriever
    from .manifest import Manifest, ManifestError
    from .server import ServerConfig, serve_forever

    try:
        manifest = Manifest.load(args.index)
        if args.corpus is not None:
            manifest.check_corpus(args.corpus, args.index)
    except (ManifestError, OSError) as exc:
        print(f"openrlhf-search serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not _is_loopback(args.host) and not token:
        print(f"openrlhf-search serve: WARNING: binding {args.host} without a token; anyone who can reach this "
              "port can query the index", file=sys.stderr)
    cfg = ServerConfig(host=args.host, port=args.port, token=token, default_topk=args.default_topk,
                       max_topk=args.max_topk, max_queries_per_request=args.max_queries,
                       max_query_chars=args.max_query_chars, max_body_bytes=args.max_body_bytes,
                       batch_wait_ms=args.batch_wait_ms, max_batch_queries=args.max_batch)
    kwargs = {"n_threads": args.n_threads} if manifest.method in ("bm25", "hybrid") else {}
    retriever = load_retriever(args.index, **kwargs)
    retriever.search(["warm up"], topk=1)  # JIT / encoder load before the first real request
    print(f"serving {manifest.count} passages ({manifest.method}) from {args.index} on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    serve_forever(retriever, cfg, info={"method": manifest.method, "index": str(args.index)})
    return 0
