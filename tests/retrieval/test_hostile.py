"""Hostile and careless clients get a bounded, clear answer and the server stays up (loopback only, bounded counts
and times): slow headers, a trickled body, more connections than the cap, shutdown with requests half-sent, the
old token variable, a busy port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from openrlhf_search.retrieval import HTTPRetriever
from openrlhf_search.retrieval.client import LEGACY_TOKEN_ENV, TOKEN_ENV, resolve_token
from openrlhf_search.retrieval.server import RetrievalServer, ServerConfig


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _status_and_detail(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["detail"]


def test_slow_headers_and_trickled_bodies_get_408_and_the_server_keeps_serving(bm25_retriever):
    bm25_retriever.search(["warm up"], 1)  # the first search compiles; not what this test times
    cfg = ServerConfig(port=0, read_timeout_s=3.0)
    with RetrievalServer(bm25_retriever, cfg) as srv:
        silent = [_connect(srv.port) for _ in range(20)]  # connect and send nothing
        trickling = [_connect(srv.port) for _ in range(20)]
        for sock in trickling:  # part of the headers, then nothing
            sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
        body_short = _connect(srv.port)  # full headers, 10 of the 100 body bytes announced
        body_short.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
        # meanwhile an ordinary request is answered at once
        start = time.perf_counter()
        ok = httpx.post(f"{srv.url}/retrieve", json={"queries": ["capital of France"], "topk": 1}, timeout=5)
        assert ok.status_code == 200 and time.perf_counter() - start < 2.5  # not held up by the 41 slow ones
        for sock in silent + trickling:
            status, detail = _status_and_detail(_read_all(sock, timeout=5))
            assert status == 408 and "headers not received within read_timeout_s=3 s" in detail
            sock.close()
        status, detail = _status_and_detail(_read_all(body_short, timeout=5))
        assert status == 408 and "body not received within read_timeout_s=3 s (10 bytes arrived)" in detail
        body_short.close()
        metrics = httpx.get(f"{srv.url}/metrics").json()
        assert metrics["read_timeouts"] == 41
        assert httpx.post(f"{srv.url}/retrieve", json={"queries": ["paris"]}).status_code == 200


def test_connections_beyond_the_cap_get_503_at_once(bm25_retriever):
    cfg = ServerConfig(port=0, max_connections=10, read_timeout_s=30.0)
    with RetrievalServer(bm25_retriever, cfg) as srv:
        held = [_connect(srv.port) for _ in range(10)]
        time.sleep(0.3)  # let the server register them
        extra = [_connect(srv.port) for _ in range(5)]
        for sock in extra:
            start = time.perf_counter()
            status, detail = _status_and_detail(_read_all(sock, timeout=5))
            assert status == 503 and "max_connections=10" in detail and time.perf_counter() - start < 2.0
            sock.close()
        for sock in held:
            sock.close()
        time.sleep(0.3)
        with httpx.Client(base_url=srv.url) as http:
            assert http.post("/retrieve", json={"queries": ["paris"]}).status_code == 200
            assert http.get("/metrics").json()["rejected_connections"] == 5


def test_shutdown_answers_half_sent_requests_503_without_waiting_out_the_grace(bm25_retriever):
    cfg = ServerConfig(port=0, shutdown_grace_s=20.0, read_timeout_s=60.0)
    srv = RetrievalServer(bm25_retriever, cfg).start()
    half = [_connect(srv.port) for _ in range(5)]
    for sock in half:
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n" + b'{"queries"')
    time.sleep(0.3)
    start = time.perf_counter()
    srv.stop(timeout=15)
    assert not srv.thread.is_alive() and time.perf_counter() - start < 5.0  # not the 20 s grace period
    for sock in half:
        status, detail = _status_and_detail(_read_all(sock, timeout=5))
        assert status == 503 and "shutting down" in detail
        sock.close()
    assert srv.app.state.metrics.shutdown_refused == 5


def test_both_token_variables_are_read_by_server_and_client(bm25_retriever, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(LEGACY_TOKEN_ENV, "old-name")
    assert resolve_token() == "old-name"
    monkeypatch.setenv(TOKEN_ENV, "new-name")
    assert resolve_token() == "new-name"  # the documented name wins when both are set
    monkeypatch.delenv(TOKEN_ENV)
    with RetrievalServer(bm25_retriever, ServerConfig(port=0, token="old-name")) as srv:
        with HTTPRetriever(srv.url, retries=0) as client:  # reads $OPENRLHF_SEARCH_TOKEN: not locked out
            assert client.search(["capital of France"], 1)[0][0].document.id == "paris"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(bm25_dir, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "openrlhf_search", "serve", "--index", str(bm25_dir), "--port", str(port), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_up(proc: subprocess.Popen, port: int) -> None:
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"server did not start: {proc.communicate(timeout=5)}")
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_cli_busy_port_and_clean_shutdown(bm25_dir, sig):
    port = _free_port()
    proc = _serve(bm25_dir, port, "--shutdown-grace-s", "30")
    try:
        _wait_up(proc, port)
        # a second server on the same port: one line, exit 2, and it never claims to be serving
        busy = _serve(bm25_dir, port)
        out, err = busy.communicate(timeout=60)
        assert busy.returncode == 2 and "serving" not in err, err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
        half = _connect(port)
        half.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n" + b'{"queries"')
        time.sleep(0.3)
        start = time.perf_counter()
        proc.send_signal(sig)
        status, detail = _status_and_detail(_read_all(half, timeout=10))
        assert status == 503 and "shutting down" in detail
        half.close()
        out, err = proc.communicate(timeout=20)
        # SIGTERM: uvicorn re-raises it after its shutdown, so the status says "terminated by SIGTERM", as usual
        assert proc.returncode in (0, -sig) and time.perf_counter() - start < 10.0
        assert "Traceback" not in err and "Cancel" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


if os.name != "posix":  # signals and raw sockets as used here
    pytestmark = pytest.mark.skip("POSIX only")
