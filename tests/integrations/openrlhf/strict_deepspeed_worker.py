"""One OpenRLHF DeepSpeed "actor" process under the strict device proxy (run by test_strict_deepspeed.py).

Usage: ``python strict_deepspeed_worker.py OUT.json PORT``. Set up like a Ray GPU actor on a CPU machine
(``CUDA_VISIBLE_DEVICES=3``, ``LOCAL_RANK=0``, the OpenRLHF CPU shim, ``OPENRLHF_SEARCH_STRICT_DEVICES=1``), it runs
OpenRLHF's ``DeepspeedStrategy.setup_distributed`` (which installs the proxy and the strict DeepSpeed accelerator),
then tiny DeepSpeed engines (ZeRO-0/2/3, bf16) with correctly placed and planted host inputs, OpenRLHF's own
step-normaliser and replay buffer, and writes what happened per case ("ok" or the error message) to OUT.json.
"""

import json
import os
import sys
from types import SimpleNamespace

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  CUDA_VISIBLE_DEVICES="3", OPENRLHF_SEARCH_STRICT_DEVICES="1", OPENRLHF_SEARCH_CPU_SHIM="1",
                  DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")  # fmt: skip

from openrlhf_search.integrations.openrlhf import cpu_shim  # noqa: E402

cpu_shim.install()
import torch  # noqa: E402

results: dict = {}


def run(name, fn):
    try:
        out = fn()
        results[name] = "ok" if out is None else out
    except Exception as exc:  # noqa: BLE001 -- recorded for the test
        results[name] = f"{type(exc).__name__}: {exc}"


def main() -> int:
    from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy

    from openrlhf_search.integrations import strict_devices as sd
    from openrlhf_search.integrations.openrlhf import strict_deepspeed

    args = SimpleNamespace(local_rank=-1, ds=SimpleNamespace(param_dtype="bf16"), train=SimpleNamespace())
    strategy = DeepspeedStrategy(seed=1, micro_train_batch_size=2, train_batch_size=2, zero_stage=2, args=args)
    strategy.setup_distributed()
    results["installed"] = strict_deepspeed.installed()
    results["current_device"] = torch.cuda.current_device()
    results["fake_gpu"] = sd.fake_gpu_index()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    results["accelerator"] = get_accelerator().current_device_name()
    dev = torch.cuda.current_device()
    for stage in (0, 2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
               "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        results[f"z{stage}_param_device"] = str(next(engine.module.parameters()).device)
        run(f"z{stage}_host_input", lambda engine=engine: engine(torch.randn(2, 8, dtype=torch.bfloat16)) and None)

        def steps(engine=engine):
            losses = []
            for _ in range(3):
                x = torch.randn(2, 8, dtype=torch.bfloat16).to(dev)
                loss = engine(x).float().pow(2).mean()
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            return {"losses": losses, "loss_device": str(loss.device)}

        run(f"z{stage}_steps", steps)
    from openrlhf.utils.loss_utils import _get_dp_group, _optimizer_step_loss_norm

    mask = torch.ones(2, 5).to(dev)
    norm = _optimizer_step_loss_norm
    run("loss_norm", lambda: str(norm([mask], _get_dp_group(strategy), 1, 1)["batch_num_tokens"].device))
    run("strategy_all_reduce", lambda: strategy.all_reduce({"x": 1.0, "y": torch.tensor([2.0])}) and None)
    from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer

    results["replay_target"] = str(NaiveReplayBuffer(sample_batch_size=1).target_device)
    import threading

    def other_thread():  # no proxy on a thread the mode was not entered on: the plain CPU names, no real CUDA
        results["other_thread_accelerator"] = get_accelerator().current_device_name()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    results["counters"] = strict_deepspeed.counters()
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
