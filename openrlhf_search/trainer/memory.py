"""Process memory of a training run: what the step loop logs (``memory/*``) and how it keeps the figure flat.

On CPU, PyTorch tensors live in the C allocator's heap. Every RL step allocates activations, logits and KV caches
whose sizes change with the sampled lengths; glibc's ``malloc`` serves medium blocks (below its adaptive mmap
threshold, up to 32 MB) from heaps it does not hand back to the system when they are freed in the middle, so the
resident set drifts up to the largest step seen although no tensor outlives its step. :func:`release_freed_memory`
asks glibc to return every free page (``malloc_trim(0)``) once per step: between steps the resident set is then the
model and optimizer state, and each step's peak is that step's own (``benchmarks/memory_growth.py``). CUDA memory is
PyTorch's own caching allocator and is reported, not trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _LIBC = lib if hasattr(lib, "malloc_trim") else False  # musl has no malloc_trim
            except OSError:
                pass
    return _LIBC


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``); False where unsupported."""
    lib = _libc()
    if not lib:
        return False
    lib.malloc_trim(0)
    return True


def rss_bytes() -> int:
    """The resident set size of this process now (0 where ``/proc`` is unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_metrics() -> dict[str, float]:
    """``memory/rss_gb``, ``memory/peak_rss_gb`` and, with CUDA, ``memory/cuda_allocated_gb`` and
    ``memory/cuda_peak_gb`` (the step's peak; the counter is reset for the next step)."""
    gb = 1024**3
    out = {"memory/rss_gb": rss_bytes() / gb, "memory/peak_rss_gb": peak_rss_bytes() / gb}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/cuda_allocated_gb"] = torch.cuda.memory_allocated() / gb
        out["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / gb
        torch.cuda.reset_peak_memory_stats()
    return out


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable by the garbage collector: what the Python side keeps
    alive, independent of the allocator (for tests and benchmarks; walks every object, so not per step)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor):  # type(): never a lazy module attribute's __class__
                continue
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key in seen or obj.device.type == "meta":
                continue
            seen.add(key)
            total += storage.nbytes()
        except Exception:  # a tensor subclass or a freed storage: not ours to count
            continue
    return total
