"""Bucketed weight sync from a Megatron policy to vLLM (or any receiver) in HF parameter names.

Per-parameter broadcasts (OpenRLHF's ``broadcast_to_vllm``: one RPC + one collective per tensor, ~400 for a
14B model) are latency-bound at scale (OpenRLHF issue 533). Here the full HF tensors (gathered rank by rank
from the TP/PP shards by :func:`..model.iter_hf_weights`) are packed into flat buffers of at most
``bucket_bytes`` (one dtype per bucket) and sent with one metadata message and one broadcast per bucket.

Protocol, over a :class:`Transport` whose source is the sender (training rank 0)::

    repeat: send_meta(BucketMeta | None); if meta: broadcast(flat[meta.numel] of meta.dtype)

(:class:`TorchGroupTransport` for a registered torch group; :class:`RawProcessGroupTransport` for a stateless
group between training rank 0 and vLLM workers outside the training world.)

The receiver (:func:`receive_buckets`, e.g. inside a vLLM worker extension) rebuilds each bucket's tensors and
hands them to a loader such as ``model.load_weights(weights=...)``. Time, bytes and bucket count of every
sync are logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class TensorMeta:
    """Where one tensor lives inside a flat bucket."""

    name: str
    """HF parameter name."""
    shape: tuple[int, ...]
    """Tensor shape."""
    offset: int
    """Element offset inside the bucket's flat buffer."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class BucketMeta:
    """Metadata of one bucket: dtype and the tensors packed into it, in order."""

    dtype: torch.dtype
    """Element type shared by every tensor of the bucket."""
    tensors: list[TensorMeta] = field(default_factory=list)
    """Packed tensors."""

    @property
    def numel(self) -> int:
        """Elements of the flat buffer."""
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the flat buffer."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def encode_meta(meta: BucketMeta | None) -> bytes | None:
    """Wire form of a :class:`BucketMeta` for RPC layers that do not keep dataclasses (vLLM's ``collective_rpc``
    turns them into dicts): pickled bytes; ``None`` (end of sync) stays ``None``."""
    import pickle

    return None if meta is None else pickle.dumps(meta)


def decode_meta(obj: BucketMeta | bytes | None) -> BucketMeta | None:
    """Inverse of :func:`encode_meta` (a :class:`BucketMeta` or ``None`` passes through)."""
    import pickle

    if isinstance(obj, (bytes, bytearray)):
        obj = pickle.loads(obj)
    if obj is not None and not isinstance(obj, BucketMeta):
        raise TypeError(f"weight sync: expected BucketMeta, bytes or None, got {type(obj).__name__}")
    return obj


@dataclass
class SyncStats:
    """What one sync moved and how long it took."""

    buckets: int = 0
    """Number of buckets (= broadcasts of data)."""
    tensors: int = 0
    """Number of HF tensors."""
    bytes: int = 0
    """Payload bytes."""
    seconds: float = 0.0
    """Wall time of the whole sync (gather + pack + send)."""


def bucket_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[tuple[BucketMeta, list[torch.Tensor]]]:
    """Group a stream of named tensors into consecutive buckets of at most ``bucket_bytes`` and one dtype.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Order is preserved. Pure (no communication).

    Yields:
        ``(meta, tensors)`` per bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    meta: BucketMeta | None = None
    items: list[torch.Tensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if meta is not None and (tensor.dtype != meta.dtype or size + nbytes > bucket_bytes):
            yield meta, items
            meta, items, size = None, [], 0
        if meta is None:
            meta = BucketMeta(dtype=tensor.dtype)
        meta.tensors.append(TensorMeta(name=name, shape=tuple(tensor.shape), offset=meta.numel))
        items.append(tensor)
        size += nbytes
    if meta is not None:
        yield meta, items


def pack_bucket(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (same dtype) into one flat contiguous buffer."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unpack_bucket(meta: BucketMeta, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of ``flat`` as the named tensors described by ``meta``."""
    return [(t.name, flat[t.offset : t.offset + t.numel].view(t.shape)) for t in meta.tensors]


class Transport:
    """How bucket metadata and payloads travel from the sender to the receivers (one per process group kind)."""

    def send_meta(self, meta: BucketMeta | None) -> None:
        """Sender: announce the next bucket (None = end of sync)."""
        raise NotImplementedError

    def recv_meta(self) -> BucketMeta | None:
        """Receiver: the next bucket's metadata (None = end of sync)."""
        raise NotImplementedError

    def broadcast(self, flat: torch.Tensor) -> None:
        """Broadcast ``flat`` from the sender into the receivers' same-shaped buffers (in place)."""
        raise NotImplementedError


class TorchGroupTransport(Transport):
    """Transport over a registered ``torch.distributed`` group (metadata via ``broadcast_object_list``)."""

    def __init__(self, group: Any, src: int) -> None:
        self.group, self.src = group, src

    def send_meta(self, meta: BucketMeta | None) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([meta], src=self.src, group=self.group)

    def recv_meta(self) -> BucketMeta | None:
        import torch.distributed as dist

        holder: list[Any] = [None]
        dist.broadcast_object_list(holder, src=self.src, group=self.group)
        return holder[0]

    def broadcast(self, flat: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.broadcast(flat, src=self.src, group=self.group)


class RawProcessGroupTransport(Transport):
    """Transport over an unregistered process group object (``ProcessGroupGloo(store, rank, size)`` or similar),
    as used between training rank 0 and vLLM workers, which live outside the training world.

    Metadata is pickled into a uint8 tensor (length first, then bytes). ``src`` is the sender's rank in the group.
    """

    def __init__(self, pg: Any, src: int = 0) -> None:
        self.pg, self.src = pg, src

    def _bcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = self.src
        self.pg.broadcast([t], opts).wait()

    def send_meta(self, meta: BucketMeta | None) -> None:
        import pickle

        payload = torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8)
        self._bcast(torch.tensor([payload.numel()], dtype=torch.long))
        self._bcast(payload)

    def recv_meta(self) -> BucketMeta | None:
        import pickle

        size = torch.zeros(1, dtype=torch.long)
        self._bcast(size)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._bcast(payload)
        return pickle.loads(payload.numpy().tobytes())

    def broadcast(self, flat: torch.Tensor) -> None:
        self._bcast(flat)


def send_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    transport: Transport | None,
    bucket_bytes: int,
    device: Any = "cpu",
) -> SyncStats:
    """Sender side: stream ``named_tensors`` to the receivers in buckets.

    Every rank producing ``named_tensors`` must iterate it (the TP/PP gather behind it is collective); only the
    sending rank passes a ``transport`` (the others pass None and just drive the gather).

    Args:
        named_tensors: ``(hf_name, tensor)`` stream, identical order on all model ranks.
        transport: how to reach the receivers (None on non-sending ranks).
        bucket_bytes: bucket size bound.
        device: device of the broadcast buffers (``cuda`` with NCCL, ``cpu`` with gloo).
    """
    start = time.perf_counter()
    stats = SyncStats()
    for meta, tensors in bucket_tensors(named_tensors, bucket_bytes):
        stats.buckets += 1
        stats.tensors += len(tensors)
        stats.bytes += meta.nbytes
        if transport is None:
            continue
        transport.send_meta(meta)
        transport.broadcast(pack_bucket(tensors).to(device))
    if transport is not None:
        transport.send_meta(None)
    stats.seconds = time.perf_counter() - start
    if transport is not None:
        logger.info(
            "weight sync: %d tensors, %.1f MiB in %d buckets (<= %.1f MiB) in %.3f s",
            stats.tensors,
            stats.bytes / 2**20,
            stats.buckets,
            bucket_bytes / 2**20,
            stats.seconds,
        )
    return stats


def receive_buckets(
    *,
    transport: Transport,
    load: Callable[[list[tuple[str, torch.Tensor]]], Any],
    device: Any = "cpu",
) -> SyncStats:
    """Receiver side of :func:`send_buckets`: call ``load(named_tensors)`` once per bucket until the end marker.

    The tensors passed to ``load`` are views of a fresh buffer per bucket (safe to keep).
    """
    start = time.perf_counter()
    stats = SyncStats()
    while True:
        meta = transport.recv_meta()
        if meta is None:
            break
        flat = torch.empty(meta.numel, dtype=meta.dtype, device=device)
        transport.broadcast(flat)
        load(unpack_bucket(meta, flat))
        stats.buckets += 1
        stats.tensors += len(meta.tensors)
        stats.bytes += meta.nbytes
    stats.seconds = time.perf_counter() - start
    return stats
