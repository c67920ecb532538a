"""Where a batch-1 request's time goes in ``openrlhf-search serve`` (CPU seconds, so that a loaded machine's
waiting does not count): in-process retrieval per query, request parsing, the ASGI application with FastAPI's
route vs the raw ``POST /retrieve`` path (no socket), and the whole server process under 16 concurrent clients
(``/proc/<pid>/stat`` user+system time per request, i.e. uvicorn, sockets and all).

    nice -n 10 python benchmarks/retrieval_server_profile.py            # BM25 on the 100k synthetic corpus
    nice -n 10 python benchmarks/retrieval_server_profile.py --requests 1600

The index and queries are those of ``benchmarks/retrieval_server.py`` (built there if missing). Retrieval runs
with one thread everywhere (``--n-threads 1`` for the server): numba's idle workers spin, and CPU time would count
the spinning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_common import DEFAULT_WORKDIR, machine, sample_queries, synthetic_corpus  # noqa: E402
from retrieval_server import SERVER_PIDS, raw_clients, serve  # noqa: E402


def _cpu() -> float:
    return time.process_time()  # this process, all threads


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scope(body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "path": "/retrieve", "raw_path": b"/retrieve", "query_string": b"", "root_path": "", "scheme": "http",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}


async def _asgi_requests(app, lifespan_app, bodies: list[bytes], clients: int) -> float:
    """CPU seconds per request of ``clients`` concurrent ASGI calls of ``app`` (no socket)."""

    async def one(body: bytes) -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        out = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            out.append(message)

        await app(_scope(body), receive, send)
        assert out[0]["status"] == 200, out

    async with lifespan_app.router.lifespan_context(lifespan_app):
        await asyncio.gather(*(one(b) for b in bodies[:clients]))  # warm-up
        start = _cpu()
        for i in range(0, len(bodies), clients):
            await asyncio.gather(*(one(b) for b in bodies[i : i + clients]))
        return (_cpu() - start) / len(bodies)


def _Stub(docs):
    """An in-process retriever that returns rows 0..k-1 at once (isolates the server's own per-request cost)."""
    import numpy as np

    from openrlhf_search.retrieval.inprocess import InProcessRetriever

    class Stub(InProcessRetriever):
        def score_rows(self, queries, topk):
            rows = np.tile(np.arange(topk, dtype=np.int64), (len(queries), 1))
            return rows, np.tile(np.arange(topk, 0, -1, dtype=np.float32), (len(queries), 1))

    stub = Stub()
    stub.docs = docs
    return stub


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=960)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()

    from openrlhf_search.retrieval import jsonfast
    from openrlhf_search.retrieval.bm25 import BM25Index, BM25Retriever
    from openrlhf_search.retrieval.server import ServerConfig, create_app, parse_retrieve_request

    corpus = synthetic_corpus(args.workdir / f"corpus_{args.passages}.jsonl", args.passages)
    index_dir = args.workdir / f"bm25_{args.passages}"
    if not (index_dir / "manifest.json").exists():
        BM25Index.build(corpus, index_dir, show_progress=True)
    queries = sample_queries(corpus, args.requests)
    k, n, c = args.topk, args.requests, args.clients
    bodies = [json.dumps({"queries": [q], "topk": k, "return_scores": True}).encode() for q in queries]
    # one retrieval thread everywhere: numba's idle worker threads spin, which CPU time would count as work
    retriever = BM25Retriever(BM25Index.load(index_dir), n_threads=1)
    retriever.search(queries[:c], k)
    us: dict[str, float] = {}

    for name, size in (("batch 16", c), ("batch 1", 1), ("batch 16, again", c)):
        start = _cpu()
        for i in range(0, n, size):
            retriever.search(queries[i : i + size], k)
        us[f"in-process search, {name}, per query"] = (_cpu() - start) / n * 1e6
    cfg = ServerConfig()
    start = _cpu()
    for _ in range(10):
        for b in bodies:
            parse_retrieve_request(b, cfg)
    us["parse + validate one body"] = (_cpu() - start) / n / 10 * 1e6
    hits = [[{"document": h.document.to_json(), "score": h.score} for h in retriever.search([queries[0]], k)[0]]]
    start = _cpu()
    for _ in range(10 * n):
        jsonfast.dumps({"result": hits})
    us["encode one batch-1 response"] = (_cpu() - start) / n / 10 * 1e6
    stub_app = create_app(_Stub(retriever.docs), cfg)  # no retrieval work: what the framework alone costs
    us["ASGI app via FastAPI's route, stub retriever (framework + batcher only), per request"] = asyncio.run(
        _asgi_requests(stub_app.app, stub_app.app, bodies, c)) * 1e6
    us["ASGI app via the raw POST /retrieve path, stub retriever, per request"] = asyncio.run(
        _asgi_requests(stub_app, stub_app.app, bodies, c)) * 1e6
    app = create_app(retriever, cfg)
    us["ASGI app via FastAPI's route (batcher + retrieval), per request"] = asyncio.run(
        _asgi_requests(app.app, app.app, bodies, c)) * 1e6
    us["ASGI app via the raw POST /retrieve path (batcher + retrieval), per request"] = asyncio.run(
        _asgi_requests(app, app.app, bodies, c)) * 1e6
    log = args.workdir / "server_profile.log"
    with serve(index_dir, log, "--n-threads", "1") as url:
        singles = [[q] for q in queries]
        raw_clients(url, singles[: 2 * c], c, k)
        pid = SERVER_PIDS[url]
        cpu0, wall0, client0 = _proc_cpu(pid), time.perf_counter(), _cpu()
        run = raw_clients(url, singles, c, k)
        us["whole server process (uvicorn, sockets, app, retrieval), per request"] = (_proc_cpu(pid) - cpu0) / n * 1e6
        us["load generator (16 asyncio clients), per request"] = (_cpu() - client0) / n * 1e6
        wall = time.perf_counter() - wall0
    result = {"machine": machine(), "passages": args.passages, "requests": n, "clients": c,
              "cpu_us": {name: round(v, 1) for name, v in us.items()}, "server_qps": run["qps"],
              "wall_s": round(wall, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
