"""A CPU stand-in for CUDA that keeps the GPU world's placement rules (the "strict device proxy").

The CPU shims (``megatron/cpu_shim.py``, ``openrlhf/cpu_shim.py``) run GPU code on a CPU-only machine by mapping
every CUDA placement to the CPU. On their own they erase the difference between a tensor the code put on the GPU
and one it forgot on the host, so a test cannot see the device mismatch or the NCCL refusal a GPU run hits at its
first step. Under this module every tensor carries a *logical device*:

* a tensor the code places on CUDA -- ``.cuda()``, ``.to("cuda")``/``.to(0)``, ``device="cuda"``/
  ``device=torch.cuda.current_device()`` on a factory, a module moved with ``.cuda()``/``.to("cuda")``, a
  ``torch.nn.Parameter`` wrapping such a tensor -- is *logical-CUDA* on this process's current device
  (:func:`current_device_index`, what ``torch.cuda.current_device()`` answers: an index among the visible GPUs, as on
  a GPU; its storage is still the CPU's); a factory without a CUDA device, ``.cpu()`` and ``.to("cpu")`` give
  *logical-CPU*; every other op's result inherits the device of its tensor inputs;
* an op mixing logical-CUDA and logical-CPU tensors (or two fake GPUs) raises the ``RuntimeError`` torch raises
  on a GPU ("Expected all tensors to be on the same device ..."), except what torch itself allows: 0-dim CPU
  tensors in element-wise ops, ``copy_``, ``.to``, indexing and item assignment;
* ``tensor.device``/``is_cuda``/``get_device()`` answer with the logical device, so code that allocates
  ``device=x.device`` follows ``x``; ``.numpy()`` of a logical-CUDA tensor raises like torch does;
* a ``torch.distributed`` collective or point-to-point call on a group that would use NCCL on GPUs (every group
  not created with an explicit gloo backend) raises for a logical-CPU tensor ("No backend type associated with
  device type cpu");
* a ``torch.Generator(device="cuda")`` is a CPU generator with a logical CUDA device (``generator.device`` answers
  ``cuda:N``); an op given ``generator=`` (``multinomial``, ``randn``/``rand``/``randint``/``randperm``/``normal``/
  ``bernoulli``, ``normal_``/``uniform_``/... on a tensor) raises like torch on a GPU when the generator's device type
  is not that of the op's tensors or of the factory's ``device=`` ("Expected a 'cuda' device type for generator but
  found 'cpu'"); generators created before the proxy keep their real (CPU) device;
* every process has a fake GPU (:func:`fake_gpu_index`: ``OPENRLHF_SEARCH_FAKE_GPU``, else
  ``CUDA_VISIBLE_DEVICES[LOCAL_RANK]`` as Ray sets it per actor, else ``LOCAL_RANK``); an NCCL-like group with
  two ranks on one fake GPU of one host raises ("Duplicate GPU detected"), as NCCL does
  (:func:`check_nccl_members`; also used by the weight-sync group of the OpenRLHF shim).

Tensors created where no torch-function mode runs (autograd's backward outside the callbacks that
:func:`track_backward` or the Megatron shim re-enter the mode in, C++ internals, unpickled from another process)
have *no* logical device and are accepted with anything; see
``docs/strict-devices.md`` for what this can and cannot catch.

Switch: ``OPENRLHF_SEARCH_STRICT_DEVICES=1`` (both CPU shims read it; :func:`enabled`), or the context manager
:func:`strict_devices` in-process. It refuses to run where CUDA is really available (the real rules apply there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

ENV_SWITCH = "OPENRLHF_SEARCH_STRICT_DEVICES"
"""Environment switch: ``1`` makes the CPU shims strict (logical devices, NCCL rules)."""

ENV_FAKE_GPU = "OPENRLHF_SEARCH_FAKE_GPU"
"""Optional explicit fake GPU index of this process (overrides ``CUDA_VISIBLE_DEVICES``/``LOCAL_RANK``)."""

_TAG = "_strict_logical_device"
CPU = -1
"""Logical device tag of a logical-CPU tensor (a fake GPU is its index >= 0; untracked tensors have no tag)."""

_CAT_LIKE = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"})
_UNCHECKED = frozenset(
    {"copy_", "to", "cpu", "cuda", "__getitem__", "__setitem__", "set_", "type", "type_as",
     "_has_compatible_shallow_copy_type", "is_same_size", "__get__", "__set__"}
)
"""Ops torch accepts across devices (and the placement ops handled separately)."""


def enabled() -> bool:
    """True when ``OPENRLHF_SEARCH_STRICT_DEVICES=1``."""
    return os.environ.get(ENV_SWITCH) == "1"


def fake_gpu_index(env: dict[str, str] | None = None) -> int:
    """This process's fake GPU: ``OPENRLHF_SEARCH_FAKE_GPU``, else the ``LOCAL_RANK``-th entry of
    ``CUDA_VISIBLE_DEVICES`` (Ray sets it per GPU actor; colocated actors share a bundle and so an entry), else
    ``LOCAL_RANK``, else 0."""
    env = os.environ if env is None else env
    if env.get(ENV_FAKE_GPU, "").strip():
        return int(env[ENV_FAKE_GPU])
    local_rank = int(env.get("LOCAL_RANK", "0") or 0)
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        entry = visible[local_rank % len(visible)]
        return int(entry) if entry.isdigit() else abs(hash(entry)) % 10_000
    return local_rank


_CURRENT: list[int] = []
"""The index given to ``torch.cuda.set_device`` under the proxy (empty: not called yet)."""


def current_device_index(env: dict[str, str] | None = None) -> int:
    """What ``torch.cuda.current_device()`` answers under the proxy: the index of the last
    ``torch.cuda.set_device`` call, else ``LOCAL_RANK`` (every launcher sets the device to it), else 0.

    This is an index among this process's *visible* GPUs, as on a GPU: with Ray's ``CUDA_VISIBLE_DEVICES=3``
    ``cuda:0`` and ``torch.cuda.current_device()`` are the same device. Logical tags use this index space (so a
    literal ``"cuda:0"``, e.g. DeepSpeed's ``device_name(local_rank)``, matches ``current_device()``);
    :func:`fake_gpu_index` is the physical GPU that NCCL compares across processes."""
    if _CURRENT and env is None:
        return _CURRENT[-1]
    env = os.environ if env is None else env
    return int(env.get("LOCAL_RANK", "0") or 0)


def _set_device(device: Any = None) -> None:
    """``torch.cuda.set_device`` under the proxy: remember the index (no CUDA is touched)."""
    dev = _parse_device(device)
    if dev is not None and dev != CPU:
        _CURRENT[:] = [dev]


def process_location() -> tuple[str, int]:
    """``(host, fake GPU index)`` of this process: what NCCL compares to find two ranks on one GPU."""
    return socket.gethostname(), fake_gpu_index()


def check_nccl_members(members: list[tuple[str, int]], what: str = "NCCL group") -> None:
    """Raise like NCCL when two members of one NCCL communicator are on the same GPU of the same host.

    Args:
        members: ``(host, gpu index)`` per rank of the group, in group-rank order.
        what: name of the group for the message (e.g. ``"weight-sync group (trainer rank 0 + vLLM workers)"``).
    """
    seen: dict[tuple[str, int], int] = {}
    for rank, loc in enumerate(members):
        if loc in seen:
            raise RuntimeError(
                f"NCCL error: invalid usage: Duplicate GPU detected: rank {rank} and rank {seen[loc]} both on "
                f"CUDA device {loc[1]} of host {loc[0]} ({what}; strict device proxy). NCCL cannot connect two "
                "ranks on one GPU: colocated processes must exchange tensors by CUDA IPC, not NCCL."
            )
        seen[loc] = rank


def logical_device(t: Any) -> int | None:
    """The logical device tag of ``t`` (:data:`CPU`, a fake GPU index, or None when untracked)."""
    return getattr(t, _TAG, None)


def generator_device(generator: Any) -> int | None:
    """Logical device of a ``torch.Generator``: its tag when the proxy created it, else its real device."""
    dev = getattr(generator, _TAG, None)
    if dev is not None:
        return dev
    real = getattr(generator, "device", None)
    return _parse_device(real) if real is not None else None


@functools.cache
def _generator_class() -> type:
    """``torch.Generator`` under the proxy: CPU state, the logical device asked for (CUDA allowed)."""
    import torch

    class Generator(torch.Generator):
        """A CPU ``torch.Generator`` that carries the logical device it was created for (strict device proxy)."""

        def __new__(cls, device: Any = "cpu") -> Any:
            gen = super().__new__(cls, "cpu")
            dev = _parse_device(device)
            setattr(gen, _TAG, CPU if dev is None else dev)
            return gen

        def __init__(self, device: Any = "cpu") -> None:  # state set up by __new__
            pass

        @property
        def device(self) -> Any:
            dev = getattr(self, _TAG, CPU)
            return torch.device("cpu") if dev == CPU else torch.device("cuda", dev)

    Generator.__qualname__ = Generator.__name__ = "Generator"
    return Generator


def _check_generator(name: str, generator: Any, op_device: int | None) -> None:
    """Raise like torch on a GPU when ``generator``'s device type differs from the op's (``op_device``)."""
    gen_dev = generator_device(generator)
    if gen_dev is None or op_device is None or (gen_dev == CPU) == (op_device == CPU):
        return
    want, have = ("cpu", "cuda") if op_device == CPU else ("cuda", "cpu")
    raise RuntimeError(
        f"Expected a '{want}' device type for generator but found '{have}' (strict device proxy: torch.{name} at "
        f"{_caller()}); create the generator on the tensors' device, torch.Generator(device=x.device)"
    )


def _set(t: Any, dev: int | None) -> None:
    if dev is not None:
        try:
            setattr(t, _TAG, dev)
        except (AttributeError, RuntimeError):  # e.g. a tensor subclass without __dict__
            pass


def _name(dev: int) -> str:
    return "cpu" if dev == CPU else f"cuda:{dev}"


def _parse_device(device: Any) -> int | None:
    """Logical tag of a ``device=`` value (None when it is not a device)."""
    import torch

    if device is None or isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type == "cuda":
            return current_device_index() if device.index is None else device.index
        if device.type == "cpu":
            return CPU
        return None
    return None


def _iter_tensors(args: Any, kwargs: dict | None) -> Iterator[Any]:
    import torch

    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    yield b


def _caller() -> str:
    frame = sys._getframe(3)
    here = os.path.abspath(__file__)
    while frame is not None and (
        os.path.abspath(frame.f_code.co_filename) == here or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
    ):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


class StrictDeviceMode:
    """The torch-function mode behind :func:`strict_devices` (built lazily so importing this is torch-free)."""

    def __new__(cls) -> Any:
        return _mode_class()()


@functools.cache
def _mode_class() -> type:
    import torch
    from torch.overrides import TorchFunctionMode

    base = torch._C.TensorBase
    device_get = base.device
    is_cuda_get = base.is_cuda
    data_set = base.data

    class _StrictDeviceMode(TorchFunctionMode):
        """Redirect CUDA placements to CPU storage and track/check logical devices (see module docstring)."""

        checks = 0
        redirects = 0
        """CUDA placements given CPU storage so far (all instances)."""

        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            name = getattr(func, "__name__", "")
            owner = getattr(func, "__self__", None)
            if name == "__get__" and owner is device_get and args:
                dev = logical_device(args[0])
                if dev is not None and dev != CPU:
                    return torch.device("cuda", dev)
                return func(*args, **kwargs)
            if name == "__get__" and owner is is_cuda_get and args:
                dev = logical_device(args[0])
                return (dev is not None and dev != CPU) or func(*args, **kwargs)
            if name == "__set__" and owner is data_set and len(args) == 2:
                out = func(*args, **kwargs)
                _set(args[0], logical_device(args[1]))
                return out
            if name == "_parse_to":  # Module.to(device=...) parses its arguments: not an allocation
                return func(*args, **kwargs)
            if func is torch.Tensor.get_device:
                dev = logical_device(args[0])
                return dev if dev is not None and dev != CPU else func(*args, **kwargs)
            if name == "numpy":
                if logical_device(args[0]) not in (None, CPU):
                    raise TypeError(
                        f"can't convert {_name(logical_device(args[0]))} device type tensor to numpy. Use "
                        "Tensor.cpu() to copy the tensor to host memory first. (strict device proxy)"
                    )
                return func(*args, **kwargs)

            target: int | None = None
            if func in (torch.Tensor.cuda,):
                device = args[1] if len(args) > 1 else kwargs.pop("device", None)
                target = _parse_device(device) if device is not None else current_device_index()
                kwargs.pop("non_blocking", None)
                _StrictDeviceMode.redirects += 1
                out = args[0].view_as(args[0]) if not isinstance(args[0], torch.nn.Parameter) else args[0]
                _set(out, target)
                return out
            if func is torch.Tensor.pin_memory:
                return args[0]
            if func is torch.Tensor.to:
                rest = list(args[1:])
                for i, a in enumerate(rest):
                    if isinstance(a, torch.Tensor):
                        target = logical_device(a)
                        break
                    dev = _parse_device(a)
                    if dev is not None:
                        target = dev
                        rest[i] = "cpu"
                        _StrictDeviceMode.redirects += dev != CPU
                        break
                if "device" in kwargs:
                    target = _parse_device(kwargs["device"])
                    kwargs["device"] = "cpu"
                args = (args[0], *rest)
                out = func(*args, **kwargs)
                if target is not None and target != logical_device(args[0]) and out is args[0]:
                    out = out.view_as(out)  # a new logical placement is a new tensor, as on a GPU
                _set(out, target if target is not None else logical_device(args[0]))
                return out
            factory_default = True
            if func is torch.Tensor.cpu:
                target = CPU
            elif kwargs.get("device") is not None:
                target = _parse_device(kwargs["device"])
                factory_default = False  # e.g. device="meta": not tracked
                if target is not None and target != CPU:
                    kwargs["device"] = "cpu"
                    _StrictDeviceMode.redirects += 1
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False

            tensors = list(_iter_tensors(args, kwargs))
            if name not in _UNCHECKED and tensors:
                self._check(name, tensors)
            if kwargs.get("generator") is not None:
                if target is not None and func is not torch.Tensor.cpu:
                    op_device = target  # a factory's device=
                elif tensors:
                    devs = [d for d in (logical_device(t) for t in tensors) if d is not None]
                    op_device = next((d for d in devs if d != CPU), devs[0] if devs else None)
                else:
                    op_device = CPU if factory_default else None
                _StrictDeviceMode.checks += 1
                _check_generator(name, kwargs["generator"], op_device)
            out = func(*args, **kwargs)
            if target is None:
                if tensors:
                    devs = [d for d in (logical_device(t) for t in tensors) if d is not None]
                    target = next((d for d in devs if d != CPU), devs[0] if devs else None)
                elif factory_default:
                    target = CPU  # a factory without device= allocates on the default (CPU) device
            if target is None:
                return out
            if isinstance(out, torch.Tensor):
                if args and out is args[0] and not name.endswith("_") and logical_device(out) not in (None, target):
                    out = out.view_as(out)  # e.g. .cpu() of a logical-CUDA tensor: a new tensor, as on a GPU
                _set(out, target)
            elif isinstance(out, (tuple, list)):
                for o in out:
                    if isinstance(o, torch.Tensor):
                        _set(o, target)
            return out

        def _check(self, name: str, tensors: list[Any]) -> None:
            _StrictDeviceMode.checks += 1
            first: int | None = None
            allow_scalars = name not in _CAT_LIKE
            for t in tensors:
                dev = logical_device(t)
                if dev is None or (allow_scalars and dev == CPU and t.dim() == 0):
                    continue
                if first is None:
                    first = dev
                elif dev != first:
                    a, b = sorted((_name(first), _name(dev)), reverse=True)
                    raise RuntimeError(
                        f"Expected all tensors to be on the same device, but found at least two devices, {a} and "
                        f"{b}! (strict device proxy: torch.{name} at {_caller()})"
                    )

    return _StrictDeviceMode


# ------------------------------------------------------------------------------------------ torch.distributed
_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "gather",
    "scatter",
)
"""``torch.distributed`` calls whose tensors must be logical-CUDA on an NCCL-like group."""


class _DistState:
    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}
        self.gloo_groups: set[int] = set()
        self.world_locations: list[tuple[str, int]] | None = None
        self.world_nccl = True


_DIST = _DistState()


def _is_gloo_backend(backend: Any) -> bool:
    return backend is not None and "gloo" in str(backend).lower() and "nccl" not in str(backend).lower()


def mark_gloo_group(group: Any) -> None:
    """Declare ``group`` a gloo group on GPUs too (CPU tensors allowed on it), e.g. a CPU metadata group."""
    _DIST.gloo_groups.add(id(group))


def is_nccl_like(group: Any) -> bool:
    """Whether ``group`` (None = the world) would be an NCCL group on GPUs."""
    if group is None:
        return _DIST.world_nccl
    return id(group) not in _DIST.gloo_groups


def _check_collective(name: str, tensors: list[Any], group: Any) -> None:
    if not is_nccl_like(group):
        return
    for t in tensors:
        if logical_device(t) == CPU:
            raise RuntimeError(
                f"No backend type associated with device type cpu: torch.distributed.{name} of a CPU tensor "
                f"{tuple(t.shape)} on a group that is NCCL on GPUs (strict device proxy, at {_caller()}); "
                "move it to the GPU (device=torch.cuda.current_device()) or use a gloo group"
            )


def _wrap_collective(name: str, original: Any) -> Any:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        group = kwargs.get("group")
        if group is None:
            group = next((a for a in args if isinstance(a, torch.distributed.ProcessGroup)), None)
        _check_collective(name, list(_iter_tensors(args, kwargs)), group)
        return original(*args, **kwargs)

    return wrapper


def _world_locations() -> list[tuple[str, int]] | None:
    import torch.distributed as dist

    if _DIST.world_locations is None and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, process_location())
        _DIST.world_locations = [tuple(x) for x in gathered]
    return _DIST.world_locations


def _install_dist() -> None:
    import torch.distributed as dist

    if _DIST.saved or not dist.is_available():
        return
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            _DIST.saved[name] = getattr(dist, name)
            setattr(dist, name, _wrap_collective(name, getattr(dist, name)))
    from torch.distributed import distributed_c10d

    if hasattr(distributed_c10d, "_check_op"):  # P2POp accepts only the original isend/irecv: unwrap ours
        original_check = distributed_c10d._check_op
        _DIST.saved["c10d._check_op"] = original_check
        distributed_c10d._check_op = lambda op: original_check(getattr(op, "__wrapped__", op))
    original_p2p = dist.batch_isend_irecv
    _DIST.saved["batch_isend_irecv"] = original_p2p

    def batch_isend_irecv(p2p_op_list):
        for op in p2p_op_list:
            _check_collective("batch_isend_irecv", [op.tensor], op.group)
            op.op = getattr(op.op, "__wrapped__", op.op)  # c10d tells isend from irecv by identity
        return original_p2p(p2p_op_list)

    dist.batch_isend_irecv = batch_isend_irecv
    original_new_group = dist.new_group
    _DIST.saved["new_group"] = original_new_group

    def new_group(ranks=None, timeout=None, backend=None, *args, **kwargs):
        group = original_new_group(ranks, timeout, backend, *args, **kwargs)
        if _is_gloo_backend(backend):
            mark_gloo_group(group)
        else:
            locations = _world_locations()
            if locations is not None:
                members = sorted(ranks) if ranks is not None else list(range(len(locations)))
                check_nccl_members([locations[r] for r in members], f"torch.distributed.new_group({members})")
        return group

    dist.new_group = new_group
    if dist.is_initialized():
        locations = _world_locations()
        if locations is not None:
            check_nccl_members(locations, "the default (world) process group")


def _uninstall_dist() -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    for name, value in _DIST.saved.items():
        if name.startswith("c10d."):
            setattr(distributed_c10d, name[5:], value)
        else:
            setattr(dist, name, value)
    _DIST.saved.clear()


# ------------------------------------------------------------------------------------------ install / context
class _Installed:
    def __init__(self) -> None:
        self.mode: Any = None
        self.saved: dict[tuple[Any, str], Any] = {}


_GLOBAL: _Installed | None = None


def _patch_torch(state: _Installed) -> None:
    import torch

    state.saved[(torch.cuda, "current_device")] = torch.cuda.current_device
    torch.cuda.current_device = current_device_index
    state.saved[(torch.cuda, "set_device")] = torch.cuda.set_device
    torch.cuda.set_device = _set_device
    parameter_new = torch.nn.Parameter.__new__
    state.saved[(torch.nn.Parameter, "__new__")] = parameter_new

    def __new__(cls, data=None, requires_grad=True):
        param = parameter_new(cls, data, requires_grad)
        if data is not None:
            _set(param, logical_device(data))
        return param

    torch.nn.Parameter.__new__ = __new__
    state.saved[(torch, "Generator")] = torch.Generator
    torch.Generator = _generator_class()


def _restore(state: _Installed) -> None:
    for (owner, name), value in state.saved.items():
        setattr(owner, name, value)
    state.saved.clear()
    _CURRENT.clear()


def install() -> Any:
    """Make this process strict for good (what the shims call when :func:`enabled`); idempotent.

    Returns the global :class:`StrictDeviceMode` (already entered), so callers can re-enter it where autograd
    drops the mode stack (the megatron shim does around megatron's custom backward functions).
    """
    global _GLOBAL
    import torch

    if _GLOBAL is not None:
        return _GLOBAL.mode
    if torch.cuda.is_available():
        raise RuntimeError(f"{ENV_SWITCH}=1: the strict device proxy is for CPU-only machines (CUDA is available)")
    state = _Installed()
    _patch_torch(state)
    _install_dist()
    state.mode = StrictDeviceMode()
    state.mode.__enter__()
    _GLOBAL = state
    return state.mode


_BACKWARD: list[Any] = []
"""The mode :func:`track_backward` re-enters in autograd callbacks (empty: pass-through)."""


def _in_backward_mode(fn: Any) -> Any:
    """``fn`` run inside the mode set by :func:`track_backward` unless it is already on the thread's stack."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from torch.overrides import _get_current_function_mode_stack

        mode = _BACKWARD[-1] if _BACKWARD else None
        if mode is None or mode in _get_current_function_mode_stack():
            return fn(*args, **kwargs)
        with mode:
            return fn(*args, **kwargs)

    return wrapper


def track_backward(mode: Any = "global") -> None:
    """Re-enter ``mode`` (default: the global one; None: stop) where autograd's engine calls back into Python during
    backward, which it does without the torch-function mode stack: every ``torch.autograd.Function``'s backward
    (through ``BackwardCFunction.apply``; this includes ``nn.Module`` full backward hooks and checkpointing), tensor
    hooks (``Tensor.register_hook``) and post-accumulate-grad hooks (``register_post_accumulate_grad_hook``,
    DeepSpeed ZeRO's gradient hooks). The builtin backward formulas stay untracked (their results have no logical
    device). The wrappers are installed once, process-wide, and pass through while no mode is set; used by the
    OpenRLHF DeepSpeed actors (:mod:`.openrlhf.strict_deepspeed`)."""
    import torch
    from torch.autograd.function import BackwardCFunction

    _BACKWARD[:] = [global_mode() if mode == "global" else mode]
    if getattr(BackwardCFunction.apply, "_strict_tracked", False):
        return
    apply = _in_backward_mode(BackwardCFunction.apply)
    apply._strict_tracked = True  # type: ignore[attr-defined]
    BackwardCFunction.apply = apply
    for name in ("register_hook", "register_post_accumulate_grad_hook"):
        original = getattr(torch.Tensor, name)

        def register(self, hook, _original=original):
            return _original(self, _in_backward_mode(hook))

        functools.update_wrapper(register, original)
        setattr(torch.Tensor, name, register)


def global_mode() -> Any:
    """The mode installed by :func:`install` (None when strictness is not installed globally)."""
    return _GLOBAL.mode if _GLOBAL is not None else None


@contextlib.contextmanager
def strict_devices() -> Iterator[Any]:
    """Run the block under the strict device proxy (in-process; tests): yields the mode.

    Patches ``torch.cuda.current_device`` (fake GPU index), ``torch.nn.Parameter`` (keeps the placement of the
    wrapped tensor), ``torch.Generator`` (logical devices) and the ``torch.distributed`` collectives for the duration
    of the block.
    """
    import torch

    if _GLOBAL is not None:
        yield _GLOBAL.mode
        return
    if torch.cuda.is_available():
        raise RuntimeError("strict_devices(): CUDA is available; the strict device proxy is for CPU-only machines")
    state = _Installed()
    _patch_torch(state)
    had_dist = bool(_DIST.saved)
    _install_dist()
    mode = StrictDeviceMode()
    try:
        with mode:
            yield mode
    finally:
        _restore(state)
        if not had_dist:
            _uninstall_dist()
