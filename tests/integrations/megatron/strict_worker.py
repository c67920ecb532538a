"""One of two ranks planting the distributed mistakes the strict device proxy must catch (test_megatron_strict.py).

Under the Megatron CPU shim with ``OPENRLHF_SEARCH_STRICT_DEVICES=1`` and megatron's PP=2 groups, each scenario
records ``"ok"`` or the error message: the engine's pipeline broadcast with a CPU buffer (the old code) and with a
buffer on the model's GPU; a metrics tensor all-reduced over the data-parallel (NCCL) group on the CPU and on the
GPU; a CPU tensor on an explicit gloo group; an NCCL group of two ranks on one fake GPU (colocated) and on two.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    from openrlhf_search.integrations import strict_devices as sd
    from openrlhf_search.integrations.megatron.cpu_shim import maybe_apply_cpu_shim

    state = maybe_apply_cpu_shim()
    assert state is not None and sd.global_mode() is not None, "shim + strict switch are set by the test"
    from megatron.core import parallel_state as mpu

    from openrlhf_search.integrations.megatron import engine

    mpu.initialize_model_parallel(pipeline_model_parallel_size=2)
    gpu = torch.device("cuda", torch.cuda.current_device())
    results: dict[str, str] = {"fake_gpu": str(gpu)}

    def run(name, fn):
        try:
            fn()
            results[name] = "ok"
        except RuntimeError as exc:
            results[name] = str(exc)
        dist.barrier()

    last = mpu.is_pipeline_last_stage()
    run("pp_broadcast_cpu", lambda: engine._broadcast_from_last_stage(
        torch.ones(2, 3) if last else None, (2, 3), "cpu"))  # fmt: skip
    run("pp_broadcast_gpu", lambda: engine._broadcast_from_last_stage(
        torch.ones(2, 3, device=gpu) if last else None, (2, 3), gpu))  # fmt: skip
    # metrics: a loss value that came back as a Python float, re-wrapped without device= (the old train_step)
    group = mpu.get_pipeline_model_parallel_group()
    run("metrics_cpu", lambda: dist.all_reduce(torch.stack([torch.tensor(0.5)]), group=group))
    run("metrics_gpu", lambda: dist.all_reduce(torch.stack([torch.tensor(0.5, device=gpu)]), group=group))
    gloo = dist.new_group([0, 1], backend="gloo")
    run("gloo_group_cpu", lambda: dist.all_reduce(torch.ones(2), group=gloo))

    def nccl_group(fake_gpu: str):
        os.environ[sd.ENV_FAKE_GPU] = fake_gpu
        sd._DIST.world_locations = None  # re-read every rank's (host, fake GPU)
        dist.new_group([0, 1])

    run("colocated_nccl_group", lambda: nccl_group("0"))  # both ranks on fake GPU 0, as with colocate_all
    run("separate_nccl_group", lambda: nccl_group(str(rank)))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
