"""``openrlhf-search serve``: serve an index over HTTP with Search-R1's ``POST /retrieve`` protocol.

Example::

    openrlhf-search serve --index indexes/wiki-bm25 --corpus wiki-18.jsonl --port 8000
    curl -s 127.0.0.1:8000/retrieve -d '{"queries": ["who wrote hamlet"], "topk": 3, "return_scores": true}'

Every index file is checked first (:func:`~openrlhf_search.retrieval.integrity.check_index`): a damaged index is
refused with one line naming the file and what is wrong, exit status 2, no traceback. ``--corpus`` makes the server
also check the corpus against the index manifest (size, then SHA-256). The bearer token can come from ``--token`` or
the ``OPENRLHF_SEARCH_RETRIEVER_TOKEN`` variable (which keeps it out of ``ps``; our client, trainer, eval and the
OpenRLHF agent read the same variable; the older name ``OPENRLHF_SEARCH_TOKEN`` is read everywhere too).
``--cache PATH --cache-mode record|replay|reuse`` puts the record/replay cache
(:mod:`~openrlhf_search.retrieval.cache`) in front of the index. The port is bound before anything is announced: a
busy port is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from . import load_retriever, server
from .cache import RetrievalCache
from .client import TOKEN_ENV, resolve_token
from .integrity import check_index
from .manifest import Manifest, ManifestError
from .server import ServerConfig, bind_socket


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    parser.add_argument("--index", required=True, help="index directory written by 'openrlhf-search index'")
    parser.add_argument("--corpus", default=None, help="corpus file to check against the index manifest")
    parser.add_argument("--host", default=d.host, help=f"bind address (default {d.host}, loopback only)")
    parser.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port})")
    parser.add_argument("--token", default=None, help=f"require 'Authorization: Bearer TOKEN' (or set ${TOKEN_ENV})")
    parser.add_argument("--default-topk", type=int, default=d.default_topk, help="topk when a request omits it")
    parser.add_argument("--max-topk", type=int, default=d.max_topk,
                        help=f"largest accepted topk (default {d.max_topk}; above it a 422 names this cap)")
    parser.add_argument("--max-queries", type=int, default=d.max_queries_per_request, help="max queries per request")
    parser.add_argument("--max-query-chars", type=int, default=d.max_query_chars,
                        help=f"longer queries are truncated to this many characters and counted (default "
                             f"{d.max_query_chars})")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="max request body size")
    parser.add_argument("--read-timeout-s", type=float, default=d.read_timeout_s,
                        help=f"seconds a client may take to send headers, and again the body (default "
                             f"{d.read_timeout_s:g}; 408 after)")
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help=f"open connections beyond this get a 503 at once (default {d.max_connections})")
    parser.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s,
                        help=f"idle keep-alive connections are closed after this (default {d.keep_alive_s:g} s)")
    parser.add_argument("--shutdown-grace-s", type=float, default=d.shutdown_grace_s,
                        help=f"on shutdown, time left to retrievals in flight (default {d.shutdown_grace_s:g} s)")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                        help="micro-batching: how long to wait for more requests after the first")
    parser.add_argument("--max-batch", type=int, default=d.max_batch_queries, help="max queries per retrieval call")
    parser.add_argument("--n-threads", type=int, default=0, help="BM25 retrieval threads (0: all cores)")
    parser.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="dense: serve the FAISS index from every visible GPU, sharded (default: as built, "
                             "'index --use-gpu'); refused without faiss-gpu or a visible GPU")
    parser.add_argument("--cache", default=None, help="record/replay cache file (sqlite); default: none")
    parser.add_argument("--cache-mode", choices=("record", "replay", "reuse"), default=d.cache_mode,
                        help="record: store every answer; replay: answer only from the cache; reuse: both")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:

    try:
        check_index(args.index)
        manifest = Manifest.load(args.index)
        if args.corpus is not None:
            manifest.check_corpus(args.corpus, args.index)
    except (ManifestError, OSError) as exc:
        print(f"openrlhf-search serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    token = args.token or resolve_token()
    if not _is_loopback(args.host) and not token:
        print(f"openrlhf-search serve: WARNING: binding {args.host} without a token; anyone who can reach this "
              "port can query the index", file=sys.stderr)
    cfg = ServerConfig(host=args.host, port=args.port, token=token, default_topk=args.default_topk,
                       max_topk=args.max_topk, max_queries_per_request=args.max_queries,
                       max_query_chars=args.max_query_chars, max_body_bytes=args.max_body_bytes,
                       batch_wait_ms=args.batch_wait_ms, max_batch_queries=args.max_batch,
                       cache=args.cache, cache_mode=args.cache_mode, read_timeout_s=args.read_timeout_s,
                       max_connections=args.max_connections, keep_alive_s=args.keep_alive_s,
                       shutdown_grace_s=args.shutdown_grace_s)
    kwargs = {"n_threads": args.n_threads} if manifest.method in ("bm25", "hybrid") else {}
    if manifest.method == "dense" and args.use_gpu is not None:
        kwargs["use_gpu"] = args.use_gpu
    elif args.use_gpu:
        print(f"openrlhf-search serve: --use-gpu applies to dense indexes; {args.index} is {manifest.method}",
              file=sys.stderr)
        return 2
    try:
        retriever = load_retriever(args.index, **kwargs)
        retriever.search(["warm up"], topk=1)  # JIT / encoder load before the first real request (not cached)
        if args.cache:
            RetrievalCache(args.cache)  # an unusable cache file is refused now, not on the first request
    except Exception as exc:  # one line, no traceback: a damaged file that the cheap checks could not see
        print(f"openrlhf-search serve: refusing to start: {args.index}: {type(exc).__name__}: "
              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", file=sys.stderr)
        return 2
    try:  # bind before saying "serving": a busy port is one line, exit 2
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"openrlhf-search serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} (is another "
              "server running there? pick another --port)", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    where = retriever.placement() if hasattr(retriever, "placement") else ""
    print(f"serving {manifest.count} passages ({manifest.method}{': ' + where if where else ''}) from {args.index} "
          f"on http://{args.host}:{port}", file=sys.stderr, flush=True)
    server.serve_forever(retriever, cfg, info={"method": manifest.method, "index": str(args.index)}, sock=sock)
    return 0
