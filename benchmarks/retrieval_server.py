"""HTTP server throughput and latency vs in-process retrieval (synthetic 100k-passage corpus, top-3).

    nice -n 10 python benchmarks/retrieval_server.py
    nice -n 10 python benchmarks/retrieval_server.py --passages 20000 --requests-per-client 20 --dense-passages 0

The server runs in its own process (``openrlhf-search serve``, loopback), the clients here:

1. batch 256: ``HTTPRetriever.search(256 queries)`` one request after another vs ``BM25Retriever.search`` in this
   process on the same index (rounds interleaved);
2. 16 concurrent clients sending batch-1 requests to the default server (micro-batching on): queries/s and
   request latency p50/p90/p99. The clients are a minimal asyncio HTTP/1.1 keep-alive load generator (like
   ``wrk``), so that the figure measures the server, not Python client overhead; the same run with 16 threads of
   ``HTTPRetriever`` (httpx) is reported too;
3. the "one by one" baselines for the same batch-1 requests:
   a. the same 16 clients against a server started with ``--max-batch 1`` (each retrieval call serves one
      request: what a server without micro-batching does with concurrent clients);
   b. one client sending the requests sequentially to a server with ``--batch-wait-ms 0`` (the best case for
      sequential serving);
   the ratio ``concurrent_vs_one_by_one`` is taken against the FASTER baseline.

Steps 2-3 run for BM25 on the 100k index and, unless ``--dense-passages 0``, for a dense Flat index (MiniLM) of
``--dense-passages`` passages, where a retrieval call has a large fixed cost (one encoder forward pass).
The BM25 index is built (or reused) under ``--workdir`` with the layout of ``benchmarks/retrieval_bm25.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_common import DEFAULT_WORKDIR, batches, machine, sample_queries, synthetic_corpus  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_PIDS: dict[str, int] = {}
"""url -> pid of the servers started by :func:`serve` (the profile script reads their CPU time)."""


@contextmanager
def serve(index_dir: Path, log: Path, *extra: str):
    """Start ``openrlhf-search serve`` in a subprocess, wait for /health, yield its URL, always terminate it."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "openrlhf_search", "serve", "--index", str(index_dir), "--port", str(port), *extra]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=fh)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start; see {log}")
            time.sleep(0.2)
        SERVER_PIDS[url] = proc.pid
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def concurrent_clients(url: str, requests: list[list[str]], clients: int, topk: int) -> dict:
    """``clients`` threads share the requests round-robin; returns queries/s and latency quantiles (ms)."""
    from openrlhf_search.retrieval.client import HTTPRetriever

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(mine: list[list[str]]) -> None:
        with HTTPRetriever(url, timeout=60, retries=0) as client:
            for qs in mine:
                t0 = time.perf_counter()
                try:
                    client.search(qs, topk)
                except Exception as exc:  # counted and reported
                    with lock:
                        errors.append(repr(exc))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(requests[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    n_queries = sum(map(len, requests))
    return {"clients": clients, "requests": len(requests), "errors": len(errors), "seconds": round(wall, 3),
            "qps": round(n_queries / wall, 1), "latency_ms": {p: round(float(np.percentile(lat, q)), 2)
                                                              for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}}


async def _raw_client(port: int, requests: list[list[str]], topk: int, latencies: list[float]) -> int:
    """One keep-alive HTTP/1.1 connection sending ``requests`` in turn (a minimal load generator, like wrk).

    Request bytes are built before the clock starts and responses are checked after it stops, so the client's own
    CPU per request (which shares this machine's cores with the server) is only socket I/O and header parsing.
    """
    import asyncio

    wire = wire_requests(requests, topk)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for request in wire:
            start = time.perf_counter()
            writer.write(request)
            header = await reader.readuntil(b"\r\n\r\n")
            i = header.lower().index(b"content-length:") + 15
            payload = await reader.readexactly(int(header[i: header.index(b"\r\n", i)]))
            latencies.append(time.perf_counter() - start)
            answers.append((header, payload))
    finally:
        writer.close()
    return sum(not h.startswith(b"HTTP/1.1 200") or len(json.loads(p)["result"]) != len(qs)
               for (h, p), qs in zip(answers, requests))


def wire_requests(requests: list[list[str]], topk: int) -> list[bytes]:
    """The HTTP/1.1 bytes of each batch-1 request (built before any clock starts)."""
    out = []
    for qs in requests:
        body = json.dumps({"queries": qs, "topk": topk, "return_scores": True}).encode()
        out.append((f"POST /retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    return out


def epoll_clients(url: str, requests: list[list[str]], clients: int, topk: int, timeout: float = 120.0) -> dict:
    """``clients`` keep-alive connections driven by one thread with ``selectors`` (no asyncio): the leanest Python
    load generator, so that as little of the shared CPU as possible goes to the clients (``wrk``'s design).

    Each connection sends its next request when the previous response is complete (closed loop, one request in
    flight per connection); responses are checked after the clock stops. Raises ``TimeoutError`` if the run takes
    longer than ``timeout`` seconds (a server that stops answering must not hang the benchmark).
    """
    import selectors

    port = int(url.rsplit(":", 1)[1])
    parts = [wire_requests(requests[i::clients], topk) for i in range(clients)]
    expected = [requests[i::clients] for i in range(clients)]
    sel = selectors.DefaultSelector()
    conns = []
    for i in range(clients):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conns.append({"sock": sock, "next": 0, "buf": b"", "need": None, "t0": 0.0, "answers": []})
        sel.register(sock, selectors.EVENT_READ, i)
    latencies: list[float] = []
    start = time.perf_counter()
    active = 0
    for i, c in enumerate(conns):
        if parts[i]:
            c["t0"] = time.perf_counter()
            c["sock"].sendall(parts[i][0])
            c["next"] = 1
            active += 1
    deadline = start + timeout
    while active:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"load generator: {active} connections still waiting after {timeout} s")
        for key, _ in sel.select(timeout=1.0):
            c = conns[key.data]
            data = c["sock"].recv(1 << 20)
            if not data:
                raise ConnectionError("server closed a keep-alive connection")
            c["buf"] += data
            if c["need"] is None:
                end = c["buf"].find(b"\r\n\r\n")
                if end < 0:
                    continue
                length = next(line for line in c["buf"][:end].lower().split(b"\r\n")
                              if line.startswith(b"content-length:"))
                c["need"] = end + 4 + int(length[15:])
            if len(c["buf"]) < c["need"]:
                continue
            now = time.perf_counter()
            latencies.append(now - c["t0"])
            c["answers"].append(c["buf"][: c["need"]])
            c["buf"], c["need"] = c["buf"][c["need"]:], None
            mine = parts[key.data]
            if c["next"] < len(mine):
                c["t0"] = now
                c["sock"].sendall(mine[c["next"]])
                c["next"] += 1
            else:
                active -= 1
    wall = time.perf_counter() - start
    errors = 0
    for c, qs_list in zip(conns, expected):
        sel.unregister(c["sock"])
        c["sock"].close()
        for answer, qs in zip(c["answers"], qs_list):
            head, _, payload = answer.partition(b"\r\n\r\n")
            errors += not head.startswith(b"HTTP/1.1 200") or len(json.loads(payload)["result"]) != len(qs)
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(requests), "errors": errors, "seconds": round(wall, 3),
            "qps": round(sum(map(len, requests)) / wall, 1),
            "latency_ms": {p: round(float(np.percentile(lat, q)), 2) for p, q in (("p50", 50), ("p90", 90),
                                                                                 ("p99", 99))}}


def raw_clients(url: str, requests: list[list[str]], clients: int, topk: int) -> dict:
    """``clients`` concurrent asyncio connections (round-robin share of the requests): server capacity."""
    import asyncio

    port = int(url.rsplit(":", 1)[1])
    latencies: list[float] = []

    async def run() -> int:
        parts = [requests[i::clients] for i in range(clients)]
        return sum(await asyncio.gather(*(_raw_client(port, part, topk, latencies) for part in parts)))

    start = time.perf_counter()
    errors = asyncio.run(run())
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(requests), "errors": errors, "seconds": round(wall, 3),
            "qps": round(sum(map(len, requests)) / wall, 1),
            "latency_ms": {p: round(float(np.percentile(lat, q)), 2) for p, q in (("p50", 50), ("p90", 90),
                                                                                 ("p99", 99))}}


LOAD_GENERATORS = {"asyncio": raw_clients, "epoll": epoll_clients}
"""``--load-generator``: asyncio streams, or one thread on ``selectors`` (~20-30% less client CPU per request)."""


def in_process_ceiling(index_dir: Path, singles: list[list[str]], clients: int, k: int, rounds: int = 3) -> dict:
    """The most micro-batching can win, with no HTTP at all: in-process queries/s at batch 1 vs batch ``clients``.

    With ``clients`` concurrent batch-1 clients a retrieval call holds at most ``clients`` queries, so
    ``qps(batch=clients) / qps(batch=1)`` bounds the concurrent-vs-one-by-one ratio of any server on this machine
    (HTTP handling only adds per-request cost). Rounds alternate the two batch sizes; medians are reported.
    """
    from openrlhf_search.retrieval import load_retriever

    retriever = load_retriever(str(index_dir))
    queries = [qs[0] for qs in singles]
    retriever.search(queries[:clients], k)  # warm-up (numba compilation, encoder first call)
    runs = [("batch_1", 1, retriever), (f"batch_{clients}", clients, retriever)]
    if getattr(retriever, "n_threads", 1) > 1:  # BM25: the same batches on one thread (what the 2nd core adds)
        from openrlhf_search.retrieval.bm25 import BM25Retriever

        one = BM25Retriever(retriever.index, n_threads=1)
        one.search(queries[:clients], k)
        runs.append((f"batch_{clients}_one_thread", clients, one))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(rounds):
        for name, size, r in runs:
            start, c0 = time.perf_counter(), time.process_time()  # process time: every thread (numba's too)
            for b in batches(queries, size):
                r.search(b, k)
            rates[name].append(len(queries) / (time.perf_counter() - start))
            cpu[name].append((time.process_time() - c0) / len(queries) * 1e6)
    med = {n: float(np.median(r)) for n, r in rates.items()}
    return {"qps": {n: round(v, 1) for n, v in med.items()},
            "cpu_us_per_query": {n: round(float(np.median(c)), 1) for n, c in cpu.items()},
            "max_ratio": round(med[f"batch_{clients}"] / med["batch_1"], 2)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (``/proc/<pid>/stat``; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def concurrency_study(index_dir: Path, log: Path, singles: list[list[str]], clients: int, k: int,
                      extra: tuple[str, ...] = (), baselines: bool = True, load_generator: str = "asyncio") -> dict:
    """Micro-batched server vs in-process batch-``clients`` retrieval (the target ratio, same run) and vs the two
    one-by-one baselines, with the raw load generator (and httpx threads)."""
    import httpx

    out: dict = {"in_process_ceiling": in_process_ceiling(index_dir, singles, clients, k),
                 "load_generator": load_generator}
    warm = singles[: 2 * clients]
    clients_fn = LOAD_GENERATORS[load_generator]
    with serve(index_dir, log, *extra) as url:
        clients_fn(url, warm, clients, k)
        pid = SERVER_PIDS[url]
        s0, c0 = process_cpu_seconds(pid), time.process_time()
        run = out["microbatched_16_clients"] = clients_fn(url, singles, clients, k)
        n = sum(map(len, singles))
        run["server_cpu_us_per_query"] = round((process_cpu_seconds(pid) - s0) / n * 1e6, 1)
        run["load_generator_cpu_us_per_query"] = round((time.process_time() - c0) / n * 1e6, 1)
        run["server_batch_queries"] = httpx.get(f"{url}/metrics").json()["batch_queries"]
        out["microbatched_vs_in_process_batch16"] = round(
            run["qps"] / out["in_process_ceiling"]["qps"][f"batch_{clients}"], 3)
        # the load-independent figure: in-process CPU per query at batch 16 over the server's CPU per query, i.e.
        # the throughput ratio when the clients do not share the server's cores (rollout workers on other hosts)
        out["server_cpu_efficiency_vs_in_process_batch16"] = round(
            out["in_process_ceiling"]["cpu_us_per_query"][f"batch_{clients}"] / run["server_cpu_us_per_query"], 3)
        if not baselines:
            return out
        out["microbatched_16_httpx_threads"] = concurrent_clients(url, singles, clients, k)
    with serve(index_dir, log, "--max-batch", "1", *extra) as url:
        raw_clients(url, warm, clients, k)
        out["one_by_one_server_16_clients"] = raw_clients(url, singles, clients, k)
    with serve(index_dir, log, "--batch-wait-ms", "0", *extra) as url:
        raw_clients(url, warm, 1, k)
        out["one_by_one_sequential_client"] = raw_clients(url, singles, 1, k)
    baseline = max(out["one_by_one_server_16_clients"]["qps"], out["one_by_one_sequential_client"]["qps"])
    out["concurrent_vs_one_by_one"] = round(out["microbatched_16_clients"]["qps"] / baseline, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2048, help="queries for the batch-256 comparison")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=40)
    parser.add_argument("--dense-passages", type=int, default=1000,
                        help="also study concurrency on a dense (MiniLM, Flat) index of this many passages (0: skip)")
    parser.add_argument("--dense-requests", type=int, default=320, help="batch-1 requests for the dense study")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--load-generator", choices=sorted(LOAD_GENERATORS), default="asyncio",
                        help="the 16 batch-1 clients: asyncio streams or one selectors thread (less client CPU)")
    parser.add_argument("--ratio-only", action="store_true",
                        help="only the 16-client vs in-process batch-16 ratio (no batch-256 run, no baselines)")
    args = parser.parse_args()

    from openrlhf_search.retrieval.bm25 import BM25Index

    corpus = synthetic_corpus(args.workdir / f"corpus_{args.passages}.jsonl", args.passages)
    index_dir = args.workdir / f"bm25_{args.passages}"
    if not (index_dir / "manifest.json").exists():
        BM25Index.build(corpus, index_dir, show_progress=True)
    log = args.workdir / "server_bench.log"
    queries = sample_queries(corpus, args.queries + args.clients * args.requests_per_client)
    big = batches(queries[: args.queries], args.batch_size)
    singles = [[q] for q in queries[args.queries :]]
    k = args.topk
    result: dict = {"machine": machine(), "passages": args.passages, "batch_size": args.batch_size, "topk": k}

    if not args.ratio_only:
        batch256(index_dir, log, big, k, args.rounds, result)
    result["bm25"] = concurrency_study(index_dir, log, singles, args.clients, k, baselines=not args.ratio_only,
                                       load_generator=args.load_generator)
    if args.dense_passages:
        dense_study(args, corpus, log, singles, k, result)
    result["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    out = args.out or args.workdir / f"server_results_{args.passages}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def batch256(index_dir: Path, log: Path, big: list[list[str]], k: int, rounds: int, result: dict) -> None:
    """HTTPRetriever at batch 256 vs in-process, rounds interleaved."""
    from openrlhf_search.retrieval.bm25 import BM25Index, BM25Retriever
    from openrlhf_search.retrieval.client import HTTPRetriever

    n_queries = sum(map(len, big))
    local = BM25Retriever(BM25Index.load(index_dir))
    with serve(index_dir, log) as url:
        client = HTTPRetriever(url, timeout=120, retries=0)
        assert client.search(big[0], k) == local.search(big[0], k), "HTTP and in-process results differ"
        rates = {"in-process": [], "http": []}
        for _ in range(rounds):
            for name, fn in (("in-process", local.search), ("http", client.search)):
                start = time.perf_counter()
                for b in big:
                    fn(b, k)
                rates[name].append(n_queries / (time.perf_counter() - start))
        client.close()
        med = {name: float(np.median(r)) for name, r in rates.items()}
        result["batch256"] = {"qps": {n: round(v, 1) for n, v in med.items()},
                              "rounds": {n: [round(x, 1) for x in r] for n, r in rates.items()},
                              "http_vs_in_process": round(med["http"] / med["in-process"], 3)}
        with HTTPRetriever(url) as c:
            result["server_metrics_after_batch256"] = c._request("GET", "/metrics").json()


def dense_study(args, corpus: Path, log: Path, singles: list[list[str]], k: int, result: dict) -> None:
    """The concurrency study on a dense (MiniLM, Flat) index of ``--dense-passages`` passages."""
    from openrlhf_search.retrieval.corpus import read_corpus
    from openrlhf_search.retrieval.dense import DenseIndex

    dense_dir = args.workdir / f"dense_{args.dense_passages}"
    if not (dense_dir / "manifest.json").exists():
        docs = []
        for doc in read_corpus(corpus):
            docs.append(doc)
            if len(docs) == args.dense_passages:
                break
        DenseIndex.build(docs, dense_dir, show_progress=True)
    dense_singles = singles[: args.dense_requests]
    result["dense_flat_minilm"] = concurrency_study(dense_dir, log, dense_singles, args.clients, k,
                                                    baselines=not args.ratio_only, load_generator=args.load_generator)
    result["dense_flat_minilm"]["passages"] = args.dense_passages


if __name__ == "__main__":
    sys.exit(main())
