"""Bucketed weight sync between the Megatron policy (training rank 0) and OpenRLHF's vLLM engines.

OpenRLHF 0.11.2 syncs weights parameter by parameter: rank 0 calls ``engine.update_weight.remote(name, dtype,
shape)`` on every engine and broadcasts the tensor on the "model update" group (a vLLM ``PyNcclCommunicator``
created by ``WorkerWrap.init_process_group``). This module keeps that group and replaces the per-tensor calls by
one call + one broadcast per bucket (:mod:`.weight_sync`):

* trainer side: :class:`RayEnginesTransport` (metadata as a Ray call to every engine, payload on the group);
* vLLM side: :class:`BucketWorkerExtension`, a mixin for the vLLM worker extension class (next to OpenRLHF's
  ``WorkerWrap``), whose ``update_weight_bucket`` receives the payload and calls ``model.load_weights``.

Wiring needed in the OpenRLHF integration (owned by another module): pass
``worker_extension_cls="openrlhf_search.integrations.megatron.vllm_sync.WorkerWrapWithBuckets"`` to vLLM and add
to the vLLM Ray actor ``async def update_weight_bucket(self, meta): return await
self.llm.collective_rpc("update_weight_bucket", args=(meta,))``.

NOT verified on this machine (needs vLLM with GPUs/NCCL). The bucket protocol itself is verified on CPU with gloo
(``tests/integrations/megatron``: a separate receiver process loads the buckets and reproduces the trainer's
log-probs).
"""

from __future__ import annotations

from typing import Any

import torch

from openrlhf_search.integrations.megatron.weight_sync import BucketMeta, Transport, unpack_bucket


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
        if meta is not None:
            self._pending = [engine.update_weight_bucket.remote(meta) for engine in self.engines]

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
    ``model_config``).
    """

    def update_weight_bucket(self, meta: BucketMeta) -> None:
        if meta.dtype != self.model_config.dtype:  # type: ignore[attr-defined]
            raise ValueError(
                f"weight sync: bucket dtype {meta.dtype} != vLLM model dtype {self.model_config.dtype}"  # type: ignore[attr-defined]
            )
        flat = torch.empty(meta.numel, dtype=meta.dtype, device="cuda")
        self._model_update_group.broadcast(flat, src=0, stream=torch.cuda.current_stream())  # type: ignore[attr-defined]
        self.model_runner.model.load_weights(weights=unpack_bucket(meta, flat))  # type: ignore[attr-defined]
        del flat


def _worker_wrap_with_buckets() -> type:
    from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap

    return type("WorkerWrapWithBuckets", (BucketWorkerExtension, WorkerWrap), {})


def __getattr__(name: str) -> Any:
    # ``WorkerWrapWithBuckets`` is built lazily so importing this module does not import OpenRLHF.
    if name == "WorkerWrapWithBuckets":
        return _worker_wrap_with_buckets()
    raise AttributeError(name)
