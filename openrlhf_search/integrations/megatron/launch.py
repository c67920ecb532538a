"""Launch a Python script as ``N`` local gloo ranks (CPU debugging of Megatron layouts, and the tests).

Equivalent to ``torchrun --nproc-per-node N script.py ...`` without torchrun's agent: each rank gets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT`` and the CPU shim switch
(``OPENRLHF_SEARCH_MEGATRON_CPU_SHIM=1``), and one thread (the machine's cores are shared by the ranks).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from openrlhf_search.integrations.megatron.cpu_shim import ENV_SWITCH


def free_port() -> int:
    """A TCP port free on loopback right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on loopback right now (all bound at once, so two calls' worth of ports cannot
    coincide, as two successive :func:`free_port` calls may)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RankResult:
    """Exit status and output of one rank."""

    rank: int
    """Global rank."""
    returncode: int
    """Process exit code."""
    output: str
    """Combined stdout/stderr."""


def run_local_ranks(script: str, world_size: int, args: list[str], timeout: float = 300.0,
                    master_port: int | None = None) -> list[RankResult]:
    """Run ``python script *args`` as ``world_size`` gloo ranks on this machine and wait for all of them.

    Raises ``RuntimeError`` with every failing rank's output tail if one exits non-zero or times out.
    ``master_port``: the ranks' rendezvous port (default: a free one; pass one from :func:`free_ports` when the
    script also listens on a port of its own).
    """
    port = master_port or free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo"),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            **{ENV_SWITCH: "1"},
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, script, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(RankResult(rank, proc.returncode, out))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            results.append(RankResult(rank, -9, out + f"\n[timeout after {timeout:.0f} s]"))
    failed = [r for r in results if r.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r.rank} (exit {r.returncode}) ---\n{r.output[-4000:]}" for r in failed)
        raise RuntimeError(f"{script} failed on {len(failed)}/{world_size} ranks:\n{tails}")
    return results
