"""The strict device proxy inside OpenRLHF's DeepSpeed actors (``OPENRLHF_SEARCH_STRICT_DEVICES=1``).

On a GPU, OpenRLHF's model actors (``PolicyModelActor``, ``ReferenceModelActor``, ``CriticModelActor``,
``RewardModelActor``) keep the model, the optimizer state and every micro-batch on their GPU: DeepSpeed places
parameters and buffers with ``get_accelerator().current_device_name()``/``device_name(local_rank)`` (``"cuda:0"``)
and OpenRLHF moves batches with ``.to(torch.cuda.current_device())``. On a CPU machine DeepSpeed runs its CPU
accelerator, which names the device ``"cpu"``: under the strict proxy alone, DeepSpeed's placements would be
logical-CPU and OpenRLHF's logical-CUDA, a mismatch no GPU run has. :func:`strict_accelerator` is DeepSpeed's CPU
accelerator (same ops, same gloo communication, same CPU op builders) whose *device naming* is the CUDA
accelerator's -- ``device_name()`` ``"cuda"``/``"cuda:i"``, ``current_device()`` the proxy's current index,
``current_device_name()`` ``"cuda:<current>"``, ``on_accelerator`` true for logical-CUDA (and untracked) tensors -- so
every placement made through it is logical-CUDA on the process's GPU, as on a GPU, while the storage stays on the
CPU (the proxy redirects it).

:func:`install` (called by the OpenRLHF CPU shim at the start of ``DeepspeedStrategy.setup_distributed``, i.e. only
in the processes that own a GPU on a real cluster -- never the driver, the ``PPOTrainer`` controller or vLLM)
installs the proxy process-wide, then this accelerator. It also makes ``torch.cuda.is_available()`` answer ``True``
to OpenRLHF's own code (files of the installed ``openrlhf`` package), which has one GPU/CPU branch on it
(``openrlhf.utils.loss_utils._optimizer_step_loss_norm``): a GPU run takes the CUDA branch, so the proxy must check
that one, not the CPU branch (which would all-reduce a CPU tensor over the NCCL-like DP group, a false positive).
Every other caller (torch, transformers, DeepSpeed) still sees ``False`` and takes its CPU code paths.

Off by default; on in the opt-in OpenRLHF test suite (``tests/integrations/openrlhf/conftest.py``) and wherever
``OPENRLHF_SEARCH_STRICT_DEVICES=1`` reaches the actor processes (Ray workers inherit the driver's environment).

Installed late on purpose: DeepSpeed's import-time choices (e.g. ``zero/linear.py``'s autocast decorators) were
made with the CPU accelerator; only run-time placements use the CUDA names.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from openrlhf_search.integrations import strict_devices as sd

_STATE: dict[str, Any] = {}


def strict_accelerator() -> Any:
    """An instance of DeepSpeed's ``CPU_Accelerator`` subclass with the CUDA accelerator's device naming."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from torch.overrides import _get_current_function_mode_stack

    def tracked() -> bool:
        # the mode stack is thread-local: on a thread without the proxy a "cuda" placement would reach real CUDA,
        # so such a thread gets the plain CPU accelerator's names (untracked, as the plain shim)
        mode = sd.global_mode()
        return mode is not None and mode in _get_current_function_mode_stack()

    class StrictCPUAccelerator(CPU_Accelerator):
        """DeepSpeed's CPU accelerator, with device placements that are logical-CUDA under the strict proxy."""

        def device_name(self, device_index=None):
            if not tracked():
                return super().device_name(device_index)
            return "cuda" if device_index is None else f"cuda:{int(device_index)}"

        def current_device(self):
            return sd.current_device_index()

        def current_device_name(self):
            return f"cuda:{sd.current_device_index()}" if tracked() else super().current_device_name()

        def set_device(self, device_index):
            sd._set_device(device_index)

        def on_accelerator(self, tensor):
            return sd.logical_device(tensor) != sd.CPU  # untracked tensors: accepted, like the proxy's ops

    return StrictCPUAccelerator()


def _openrlhf_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.abspath(list(spec.submodule_search_locations)[0]) + os.sep


def _is_available_for(original: Any, gpu_dir: str | None) -> Any:
    """``torch.cuda.is_available`` that answers ``True`` to callers in ``gpu_dir`` (OpenRLHF's package)."""

    def is_available() -> bool:
        if gpu_dir is not None:
            caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
            if caller.startswith(gpu_dir):
                return True
        return original()

    is_available._strict_original = original  # type: ignore[attr-defined]
    return is_available


def install() -> bool:
    """Make this OpenRLHF model actor strict (idempotent): the strict proxy, the strict DeepSpeed accelerator and
    OpenRLHF's ``is_available()`` GPU branch. Returns False (and does nothing) unless
    ``OPENRLHF_SEARCH_STRICT_DEVICES=1`` and CUDA is really absent."""
    import torch

    if _STATE:
        return True
    if not sd.enabled():
        return False
    original = getattr(torch.cuda.is_available, "_strict_original", torch.cuda.is_available)
    if original():
        return False
    sd.install()
    sd.track_backward()  # DeepSpeed's gradient hooks allocate on the accelerator inside backward
    import deepspeed.accelerator as ds_accel

    _STATE["accelerator_before"] = ds_accel.get_accelerator()
    ds_accel.set_accelerator(strict_accelerator())
    _STATE["is_available"] = torch.cuda.is_available
    torch.cuda.is_available = _is_available_for(original, _openrlhf_dir())
    import logging

    logging.getLogger(__name__).warning(
        "openrlhf_search: strict device proxy installed in this DeepSpeed actor (pid %d, current device cuda:%d, "
        "physical fake GPU %d)", os.getpid(), sd.current_device_index(), sd.fake_gpu_index())
    return True


def counters() -> dict[str, int]:
    """Device checks and CUDA redirects the proxy made so far in this process."""
    cls = sd._mode_class()
    return {"checks": cls.checks, "redirects": cls.redirects}


def report_after_ppo_train(module: Any) -> None:
    """Log :func:`counters` after each ``ActorPPOTrainer.ppo_train`` of a strict actor (evidence that the training
    step ran under the proxy; hooked on ``openrlhf.trainer.ray.ppo_actor`` in strict mode)."""
    import functools
    import logging

    cls = module.ActorPPOTrainer
    original = cls.ppo_train

    @functools.wraps(original)
    def ppo_train(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if installed():
            logging.getLogger(__name__).warning("openrlhf_search: strict device proxy after ppo_train: %s", counters())
        return out

    cls.ppo_train = ppo_train


def installed() -> bool:
    """Whether :func:`install` made this process strict."""
    return bool(_STATE)
