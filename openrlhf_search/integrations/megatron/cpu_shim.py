"""Run megatron-core on a CPU-only machine (gloo), for tests and CI.

megatron-core assumes CUDA everywhere. This module neutralises every CUDA touchpoint of megatron-core
0.16.x that a GPTModel forward/backward, the pipeline schedules, the DDP grad buffers and the
(distributed) optimizer reach, so that tensor/pipeline/data parallel runs on CPU with the gloo backend
give the same numbers as a single process. The touchpoints (see ``docs/megatron.md``):

* the CUDA RNG tracker (``tensor_parallel/random.py``): CUDA RNG state get/set/seed are mapped to the
  CPU default generator, which is the generator CPU kernels actually use;
* hard-coded ``device="cuda"``, ``.cuda()``, ``torch.cuda.current_device()`` devices and ``pin_memory``
  (global memory buffer, schedules, p2p, grad buffers, clipping, optimizer, rotary embedding, sequence
  parallel mappings): a global :class:`torch.overrides.TorchFunctionMode` redirects them to CPU. The mode is
  not active inside autograd's backward of custom functions, so it is re-entered around the backward of every
  ``torch.autograd.Function`` defined in megatron-core;
* ``Tensor.type()`` checks expecting ``torch.cuda.*Tensor`` strings (distributed optimizer, grad clipping):
  answered with the CUDA spelling when the caller is megatron code;
* ``current_device``/``set_device``/``synchronize``/memory statistics, streams and events: no-op fakes.

With ``OPENRLHF_SEARCH_STRICT_DEVICES=1`` the redirecting mode is the strict device proxy
(``integrations/strict_devices.py``): CUDA placements still get CPU storage, but each tensor keeps its logical
device, mixing devices raises as on a GPU, CPU tensors on NCCL-like groups raise, and
``torch.cuda.current_device()`` is this process's current (visible) GPU index (``LOCAL_RANK``) instead of 0.

The shim is applied only when CUDA is absent **and** ``OPENRLHF_SEARCH_MEGATRON_CPU_SHIM=1`` (or when
:func:`apply_cpu_shim` is called explicitly), and only by the shim/test layer, never by the product modules: inside
OpenRLHF runs the OpenRLHF CPU shim's post-import hook (:func:`patch_actor_module`) applies it in each Megatron actor
right after ``torch.distributed`` is initialised; scripts started by :func:`.launch.run_local_ranks` call
:func:`maybe_apply_cpu_shim` themselves; and it refuses megatron-core versions it was not checked on
(override with ``OPENRLHF_SEARCH_MEGATRON_CPU_SHIM_ANY_VERSION=1``). A megatron-core upgrade that adds a new
touchpoint is caught by :class:`CudaTouchRecorder` (``tests/integrations/megatron``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

from openrlhf_search.integrations import strict_devices

ENV_SWITCH = "OPENRLHF_SEARCH_MEGATRON_CPU_SHIM"
"""Environment switch: ``1`` applies the shim (when CUDA is absent) in :func:`maybe_apply_cpu_shim`."""

ENV_ANY_VERSION = "OPENRLHF_SEARCH_MEGATRON_CPU_SHIM_ANY_VERSION"
"""Environment switch: ``1`` skips the megatron-core version check (at your own risk)."""

SUPPORTED_MEGATRON_CORE = ("0.16.",)
"""megatron-core version prefixes the shim was verified on (the pinned version is 0.16.1)."""

_MEGATRON_PATH_MARKERS = (f"{os.sep}megatron{os.sep}core{os.sep}", f"{os.sep}mbridge{os.sep}")

# torch.cuda attributes the shim replaces (name -> factory of the CPU replacement) or deliberately leaves
# alone because they are harmless on CPU. Anything else megatron-core touches is an unhandled touchpoint.
HANDLED_CUDA_ATTRIBUTES = frozenset(
    {
        "current_device",
        "set_device",
        "synchronize",
        "device_count",
        "empty_cache",
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
        "reset_peak_memory_stats",
        "memory_stats",
        "get_rng_state",
        "set_rng_state",
        "manual_seed",
        "manual_seed_all",
        "Stream",
        "Event",
        "stream",
        "current_stream",
        "default_stream",
        "set_stream",
        "nvtx",
        # left unpatched: correct answers on a CPU-only torch
        "is_available",
        "is_initialized",
        "amp",
        "FloatTensor",
        "HalfTensor",
        "BFloat16Tensor",
        "OutOfMemoryError",
    }
)


IGNORED_BINDINGS = frozenset(
    {
        # neutralised by patching megatron's own _get/_set_cuda_rng_state, which are their only users
        ("megatron.core.tensor_parallel.random", "_lazy_call"),
        ("megatron.core.tensor_parallel.random", "_lazy_init"),
        ("megatron.core.tensor_parallel.random", "device_ctx_manager"),
        # Megatron-FSDP and inference memory pools: not used by this backend (DDP + distributed optimizer)
        ("megatron.core.distributed.fsdp.src.megatron_fsdp.utils", "_lazy_call"),
        ("megatron.core.distributed.fsdp.src.megatron_fsdp.utils", "_lazy_init"),
        ("megatron.core.distributed.fsdp.src.megatron_fsdp.utils", "device_ctx_manager"),
        ("megatron.core.inference.unified_memory", "CUDAPluggableAllocator"),
        ("megatron.core.inference.unified_memory", "MemPool"),
    }
)
"""``(module, global)`` torch.cuda objects bound at import in megatron-core 0.16.1 that are harmless for this
backend (reason next to each). A new binding after an upgrade makes the trace check fail until reviewed."""


@dataclass
class ShimState:
    """What :func:`apply_cpu_shim` did, so it can be inspected and undone in tests."""

    megatron_core_version: str
    """Installed megatron-core version the shim was applied to."""
    redirects: int = 0
    """Number of CUDA devices/``.cuda()``/``pin_memory`` requests redirected to CPU so far."""
    saved: dict[tuple[Any, str], Any] = field(default_factory=dict)
    """Original attributes keyed by (owner, name), restored by :func:`remove_cpu_shim`."""
    mode: Any = None
    """The global device-redirecting TorchFunctionMode."""


_STATE: ShimState | None = None


def _called_from_megatron(depth: int = 2) -> bool:
    """True when the frame ``depth`` levels up belongs to megatron-core or mbridge."""
    frame = sys._getframe(depth)
    return any(marker in frame.f_code.co_filename for marker in _MEGATRON_PATH_MARKERS)


def _is_cuda_device(device: Any) -> bool:
    """Whether ``device`` (str, int, torch.device) designates a CUDA device."""
    import torch

    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # torch interprets a bare int as cuda:<int>
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _make_redirect_mode():
    """Build the TorchFunctionMode that sends CUDA allocations/copies to CPU.

    Rewrites ``device=`` keyword arguments naming CUDA, positional devices of ``Tensor.to``, drops
    ``pin_memory=True`` and makes ``Tensor.cuda``/``Tensor.pin_memory`` identities.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    identity_funcs = {torch.Tensor.cuda, torch.Tensor.pin_memory}
    to_funcs = {torch.Tensor.to}

    class _CpuRedirectMode(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in identity_funcs:
                if _STATE is not None:
                    _STATE.redirects += 1
                return args[0]
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs["device"] = "cpu"
                if _STATE is not None:
                    _STATE.redirects += 1
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func in to_funcs and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
                if _STATE is not None:
                    _STATE.redirects += 1
            return func(*args, **kwargs)

    return _CpuRedirectMode()


class _FakeStream:
    """Stand-in for ``torch.cuda.Stream``: every operation is a no-op (CPU work is synchronous)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = "cpu"

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        return None

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _FakeEvent:
        return event if event is not None else _FakeEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __enter__(self) -> _FakeStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _FakeEvent:
    """Stand-in for ``torch.cuda.Event`` (timings are zero)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        return None

    def wait(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _cuda_replacements() -> dict[str, Any]:
    """CPU replacements for ``torch.cuda`` functions (name -> object)."""
    import torch

    def _noop(*args: Any, **kwargs: Any) -> None:
        return None

    def _zero(*args: Any, **kwargs: Any) -> int:
        return 0

    _stream = _FakeStream()
    nvtx = types.SimpleNamespace(range_push=_noop, range_pop=_noop, range=lambda *a, **k: contextlib.nullcontext())
    return {
        "current_device": _zero,
        "set_device": _noop,
        "synchronize": _noop,
        "device_count": lambda: 1,
        "empty_cache": _noop,
        "memory_allocated": _zero,
        "max_memory_allocated": _zero,
        "memory_reserved": _zero,
        "max_memory_reserved": _zero,
        "reset_peak_memory_stats": _noop,
        "memory_stats": lambda *a, **k: {},
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        # the CPU default generator is the one CPU kernels draw from; torch.manual_seed itself calls
        # torch.cuda.manual_seed_all, which must therefore not recurse.
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "manual_seed_all": _noop,
        "Stream": _FakeStream,
        "Event": _FakeEvent,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "current_stream": lambda *a, **k: _stream,
        "default_stream": lambda *a, **k: _stream,
        "set_stream": _noop,
        "nvtx": nvtx,
    }


def _installed_megatron_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError as exc:
        raise ImportError(
            "megatron-core is not installed: `pip install megatron-core==0.16.1 mbridge==0.15.1 einops`"
        ) from exc


def _check_version(installed: str) -> None:
    if os.environ.get(ENV_ANY_VERSION) == "1":
        return
    if not installed.startswith(SUPPORTED_MEGATRON_CORE):
        raise RuntimeError(
            f"megatron CPU shim: megatron-core {installed} is not a verified version "
            f"({', '.join(p + 'x' for p in SUPPORTED_MEGATRON_CORE)}); run tests/integrations/megatron "
            f"(the CUDA trace check) and extend SUPPORTED_MEGATRON_CORE, or set {ENV_ANY_VERSION}=1"
        )


def _patch(owner: Any, name: str, value: Any) -> None:
    assert _STATE is not None
    key = (owner, name)
    if key not in _STATE.saved:
        _STATE.saved[key] = getattr(owner, name, None)
    setattr(owner, name, value)


def _wrap_backward(function_cls: type, mode: Any) -> None:
    """Run ``function_cls.backward`` inside ``mode`` (autograd drops the torch-function mode stack)."""
    original = function_cls.__dict__.get("backward")
    if original is None or getattr(original, "_cpu_shim_wrapped", False):
        return
    raw = original.__func__ if isinstance(original, staticmethod) else original

    @functools.wraps(raw)
    def backward(*args: Any, **kwargs: Any) -> Any:
        from torch.overrides import _get_current_function_mode_stack

        if mode in _get_current_function_mode_stack():
            return raw(*args, **kwargs)
        with mode:
            return raw(*args, **kwargs)

    backward._cpu_shim_wrapped = True  # type: ignore[attr-defined]
    _patch(function_cls, "backward", staticmethod(backward))


def _wrap_megatron_autograd_functions(mode: Any) -> int:
    """Wrap the backward of every ``torch.autograd.Function`` defined in loaded megatron modules."""
    import torch

    count = 0
    for name, module in list(sys.modules.items()):
        if not (name.startswith("megatron.core") or name.startswith("mbridge")) or module is None:
            continue
        for obj in list(vars(module).values()):
            if (
                isinstance(obj, type)
                and issubclass(obj, torch.autograd.Function)
                and obj.__module__ == name
                and "backward" in obj.__dict__
            ):
                _wrap_backward(obj, mode)
                count += 1
    return count


def _import_megatron_modules() -> None:
    """Import the megatron-core modules whose touchpoints the shim patches (so patches reach them)."""
    import importlib

    for name in (
        "megatron.core.tensor_parallel",
        "megatron.core.tensor_parallel.random",
        "megatron.core.tensor_parallel.mappings",
        "megatron.core.tensor_parallel.layers",
        "megatron.core.tensor_parallel.cross_entropy",
        "megatron.core.models.gpt.gpt_model",
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.pipeline_parallel.p2p_communication",
        "megatron.core.distributed",
        "megatron.core.optimizer",
        "megatron.core.transformer.attention",
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
    ):
        importlib.import_module(name)


def apply_cpu_shim(*, allow_cuda: bool = False) -> ShimState:
    """Patch torch.cuda/megatron-core so megatron-core runs on CPU; idempotent.

    Args:
        allow_cuda: apply even when CUDA is available (only sensible in tests; the default refuses).

    Returns:
        The :class:`ShimState` describing the applied patches.
    """
    global _STATE
    import torch

    if _STATE is not None:
        return _STATE
    if torch.cuda.is_available() and not allow_cuda:
        raise RuntimeError("megatron CPU shim: CUDA is available; the shim is for CPU-only machines")
    installed = _installed_megatron_version()
    _check_version(installed)
    _import_megatron_modules()
    _STATE = ShimState(megatron_core_version=installed)

    for name, value in _cuda_replacements().items():
        _patch(torch.cuda, name, value)

    # megatron's own CUDA RNG helpers bypass torch.cuda.get_rng_state (they use _C / default_generators).
    from megatron.core.tensor_parallel import random as mrandom

    _patch(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))

    cuda_type_names = {
        torch.float32: "torch.cuda.FloatTensor",
        torch.float16: "torch.cuda.HalfTensor",
        torch.bfloat16: "torch.cuda.BFloat16Tensor",
    }
    original_type = torch.Tensor.type

    strict = strict_devices.enabled()

    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and _called_from_megatron():
            if strict and strict_devices.logical_device(self) == strict_devices.CPU:
                return original_type(self)  # a logical-CPU tensor answers like a CPU tensor on a GPU machine
            with torch._C.DisableTorchFunction():
                on_cpu = self.device.type == "cpu"
            if on_cpu:
                return cuda_type_names.get(self.dtype, original_type(self))
        return original_type(self, *args, **kwargs)

    _patch(torch.Tensor, "type", tensor_type)

    # On CPU the "CUDA" RNG state *is* the CPU generator, so megatron's "CPU RNG state changed within GPU
    # RNG context" warning fires on every fork; it carries no information here.
    import logging

    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )

    if strict:
        # logical devices instead of erasing them: the strict mode redirects CUDA storage to the CPU as well
        mode = strict_devices.install()
        _patch(torch.cuda, "current_device", strict_devices.current_device_index)
    else:
        mode = _make_redirect_mode()
        mode.__enter__()
    _STATE.mode = mode
    _wrap_megatron_autograd_functions(mode)
    return _STATE


def remove_cpu_shim() -> None:
    """Undo :func:`apply_cpu_shim` (restore patched attributes, leave the redirect mode)."""
    global _STATE
    if _STATE is None:
        return
    if _STATE.mode is strict_devices.global_mode():  # the process-wide strict mode stays (it is the process's)
        _STATE.mode = None
    for (owner, name), value in reversed(list(_STATE.saved.items())):
        setattr(owner, name, value)
    if _STATE.mode is not None:
        with contextlib.suppress(Exception):
            _STATE.mode.__exit__(None, None, None)
    _STATE = None


def shim_state() -> ShimState | None:
    """The applied shim's state, or None."""
    return _STATE


def maybe_apply_cpu_shim() -> ShimState | None:
    """Apply the shim iff CUDA is absent and ``OPENRLHF_SEARCH_MEGATRON_CPU_SHIM=1``; else return None."""
    import torch

    if os.environ.get(ENV_SWITCH) != "1" or torch.cuda.is_available():
        return None
    return apply_cpu_shim()


def patch_actor_module(module: types.ModuleType) -> None:
    """Post-import hook of :mod:`openrlhf_search.integrations.megatron.actor` (installed by the OpenRLHF CPU shim in
    every process, ``openrlhf/cpu_shim.py``): :func:`maybe_apply_cpu_shim` right after the actor initialises
    ``torch.distributed``, before it builds the model. The product module never applies CPU simulation itself;
    scripts that drive :class:`~.actor.MegatronActorCore` outside OpenRLHF call :func:`maybe_apply_cpu_shim`."""
    original = module._init_torch_distributed
    if getattr(original, "_megatron_cpu_shim", False):
        return

    @functools.wraps(original)
    def init_then_shim() -> None:
        original()
        maybe_apply_cpu_shim()

    init_then_shim._megatron_cpu_shim = True  # type: ignore[attr-defined]
    module._init_torch_distributed = init_then_shim


@dataclass
class CudaTouch:
    """One unhandled CUDA touchpoint seen by :class:`CudaTouchRecorder`."""

    kind: str
    """``attribute`` (a torch.cuda attribute the shim does not handle), ``binding`` (a torch.cuda object
    bound into a megatron module at import), or ``device`` (a CUDA tensor produced)."""
    name: str
    """Attribute/global name or op name."""
    where: str
    """``file:line`` of the megatron code involved (or the module name for bindings)."""


class CudaTouchRecorder:
    """Record CUDA touchpoints of megatron-core that the shim does not handle.

    Use as a context manager around a training step with the shim applied; :attr:`touches` lists every
    access from megatron-core/mbridge code to a ``torch.cuda`` attribute outside
    :data:`HANDLED_CUDA_ATTRIBUTES`, every ``torch.cuda`` function bound into a megatron module's globals at
    import (which the shim cannot patch), and every non-CPU tensor returned by a torch function.
    """

    def __init__(self) -> None:
        self.touches: list[CudaTouch] = []
        self._mode: Any = None
        self._cuda_module_class: Any = None

    def _record_bindings(self) -> None:
        import torch

        originals = {}
        for name in dir(torch.cuda):
            if name.startswith("__") or name in HANDLED_CUDA_ATTRIBUTES:
                continue
            with contextlib.suppress(Exception):
                obj = getattr(torch.cuda, name)
                if callable(obj) and str(getattr(obj, "__module__", "")).startswith("torch.cuda"):
                    originals[id(obj)] = name
        for modname, module in list(sys.modules.items()):
            if module is None or not modname.startswith("megatron.core"):
                continue
            for gname, obj in list(vars(module).items()):
                if id(obj) in originals and (modname, gname) not in IGNORED_BINDINGS:
                    self.touches.append(CudaTouch("binding", f"{gname}=torch.cuda.{originals[id(obj)]}", modname))

    def __enter__(self) -> CudaTouchRecorder:
        import torch
        from torch.overrides import TorchFunctionMode

        self._record_bindings()
        recorder = self

        class _RecordingCuda(types.ModuleType):
            def __getattribute__(self, name: str) -> Any:
                if not name.startswith("__") and name not in HANDLED_CUDA_ATTRIBUTES:
                    frame = sys._getframe(1)
                    if any(m in frame.f_code.co_filename for m in _MEGATRON_PATH_MARKERS):
                        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                        recorder.touches.append(CudaTouch("attribute", f"torch.cuda.{name}", where))
                return super().__getattribute__(name)

        class _RecordingMode(TorchFunctionMode):
            def __torch_function__(self, func, types_, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if isinstance(out, torch.Tensor):
                    with torch._C.DisableTorchFunction():  # the real device (the strict proxy reports logical ones)
                        real = out.device.type
                if isinstance(out, torch.Tensor) and real != "cpu":
                    frame = sys._getframe(1)
                    name = getattr(func, "__name__", str(func))
                    recorder.touches.append(
                        CudaTouch("device", name, f"{frame.f_code.co_filename}:{frame.f_lineno}")
                    )
                return out

        self._cuda_module_class = type(torch.cuda)
        torch.cuda.__class__ = _RecordingCuda
        self._mode = _RecordingMode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        self._mode.__exit__(*exc)
        torch.cuda.__class__ = self._cuda_module_class

    def report(self) -> str:
        """Human-readable list of unhandled touchpoints (empty string when none)."""
        seen = dict.fromkeys(f"[{t.kind}] {t.name} at {t.where}" for t in self.touches)
        return "\n".join(seen)
